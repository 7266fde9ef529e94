"""
The serving engine's scheduler (nano-vllm's scheduler.py): which sequences run each step.

    admit   sequences waiting in the queue take free slots (rows of the KV cache)
    feed    every sequence with its prompt in the cache feeds its latest token; every new one
            the next chunk of its prompt, at most prefill_chunk prompt positions a step in all,
            so that a long prompt never stalls the others for long
    finish  a sequence that is done (or cancelled by its client) frees its slot at once
"""

import collections


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, max_batch, max_queue, prefill_chunk, block_size):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.block_size = prefill_chunk, block_size
        self.free = list(range(max_batch))
        # submitted, not yet in a slot; in a slot, in the order they came
        self.waiting, self.running = collections.deque(), []

    def submit(self, *sequences):
        """Queues sequences (all or none); QueueFull when more than max_queue would wait."""
        if len(self.waiting) + len(sequences) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue={self.max_queue})")
        self.waiting.extend(sequences)

    def pending(self):
        return bool(self.waiting or self.running)

    def busy_slots(self):
        return self.max_batch - len(self.free)

    def cancelled(self):
        """The cancelled sequences, taken out of the queue and their slots."""
        gone = [s for s in [*self.waiting, *self.running] if s.cancelled]
        for s in gone:
            self.finish(s)
        return gone

    def schedule(self):
        """Admit, then this step's batch: [(sequence, the tokens it feeds)], decoding rows first."""
        while self.waiting and self.free:
            sequence = self.waiting.popleft()
            sequence.slot = self.free.pop(0)
            self.running.append(sequence)
        batch = [(s, [s.tokens[-1]]) for s in self.running if s.cached >= len(s.prompt)]
        budget = self.prefill_chunk
        for s in self.running:
            # at most prefill_chunk prompt positions a step in all, and never past the context
            n = min(len(s.prompt) - s.cached, budget, self.block_size - s.cached)
            if n > 0:
                batch.append((s, s.prompt[s.cached : s.cached + n]))
                budget -= n
        return batch

    def finish(self, sequence):
        if sequence in self.waiting:
            self.waiting.remove(sequence)
            return
        self.running.remove(sequence)
        self.free.append(sequence.slot)
        self.free.sort()
        sequence.slot = None
