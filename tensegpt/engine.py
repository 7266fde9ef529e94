"""
Continuous batching beneath serve.py: many requests share one model, one batched step at a time.

Decoding is memory-bound: a step reads every weight once whether it makes 1 token or 16, so
sequences decoded together cost little more than one alone (docs/serving.md). The engine
keeps up to max_batch sequences in the rows ("slots") of one KV cache, and loops:

    admit   requests waiting in the queue take free slots
    prefill the prompts of new sequences run through the model together, at most
            prefill_chunk positions a step, so a long prompt never stalls the others for long
    decode  every sequence with its prompt in the cache makes one token, in one batched
            forward, each row at its own position (model.py's per-row pos)
    finish  a sequence that is done (a stop token, max_tokens, the end of the context, or
            cancelled by its client) leaves at once and frees its slot for the next step

Each sequence samples with its own settings and its own random generator, so its tokens do
not depend on what else runs beside it. The engine runs in one thread (run_forever); each
sequence reports to its caller through on_token and on_finish (serve.py hands them to the
asyncio loop).
"""

import collections
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from model import positions_from, sample_next


class QueueFull(Exception):
    pass


@dataclass
class Sequence:
    """One generation: a prompt, how to sample, where it stands, and whom to tell."""

    prompt: list
    max_tokens: int
    stop_tokens: frozenset
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    seed: int = None
    on_token: callable = None  # on_token(token id), from the engine's thread
    on_finish: callable = None  # on_finish('stop', 'length', 'cancelled' or 'error')
    tokens: list = field(default_factory=list)  # the new tokens so far
    cached: int = 0  # positions of prompt + tokens held in the cache
    slot: int = None
    cancelled: bool = False

    def __post_init__(self):
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def next_token(self, logits):
        """The next token from logits (1, V) with this sequence's settings; temperature 0: the most likely."""
        greedy = self.temperature == 0
        return int(sample_next(logits, self.temperature, self.top_k, self.top_p, greedy, self.generator))


class SlotCache:
    """
    One layer's KV cache seen through a batch's slots: row i of the batch is row slots[i] of the
    cache. It does what model.KVCache.update does, on those rows only (the model reads and writes
    whatever rows the engine's batch holds, wherever they are in the cache). end: the positions
    the longest row holds after this step, known to the engine before the forward pass.
    """

    def __init__(self, cache, slots, end):
        self.cache, self.slots, self.end = cache, slots, end

    def update(self, pos, k, v):
        T = k.size(2)
        rows = self.slots[:, None]  # (B, 1)
        columns = positions_from(pos, T)  # (B, T)
        # indexing slots and positions together puts them first: (B, T, n_kv_head, hs)
        self.cache.k[rows, :, columns] = k.transpose(1, 2)
        self.cache.v[rows, :, columns] = v.transpose(1, 2)
        return self.cache.k[self.slots, :, : self.end], self.cache.v[self.slots, :, : self.end]


class Engine:
    def __init__(self, model, max_batch=16, max_queue=64, prefill_chunk=256):
        self.model, self.block_size = model, model.config.block_size
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.device = model.wte.weight.device
        self.caches = model.new_caches(max_batch)
        self.free = list(range(max_batch))
        self.waiting = collections.deque()  # submitted, not yet in a slot
        self.prefilling, self.decoding = [], []  # in a slot: prompt not yet all cached / making tokens
        self.wake = threading.Condition()
        self.stopped = False
        self.steps = 0

    # ------------------------------------------------------------------------- from the server's thread

    def submit(self, *sequences):
        """Queues sequences (all or none); QueueFull when more than max_queue would wait."""
        with self.wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue={self.max_queue})")
            self.waiting.extend(sequences)
            self.wake.notify()

    def cancel(self, sequence):
        """The client is gone: the sequence leaves at the next step and frees its slot."""
        sequence.cancelled = True
        with self.wake:
            self.wake.notify()

    def pending(self):
        """Whether any sequence is waiting for a slot or in one."""
        return bool(self.waiting or self.prefilling or self.decoding)

    def busy_slots(self):
        return self.max_batch - len(self.free)

    def stop(self):
        with self.wake:
            self.stopped = True
            self.wake.notify()

    # ------------------------------------------------------------------------- the loop, in its own thread

    def run_forever(self):
        while True:
            with self.wake:
                while not (self.stopped or self.pending()):
                    self.wake.wait()
                if self.stopped:
                    return
            try:
                self.step()
            except Exception as e:
                # a fault in a step (out of memory, say) ends the sequences in flight, not the server
                print(f"engine: a step failed ({e.__class__.__name__}: {e}); its sequences end with an error",
                      file=sys.stderr, flush=True)  # fmt: skip
                for sequence in self.prefilling + self.decoding:
                    self.finish(sequence, "error")
            # let the server's thread take the GIL between steps, to send what this step made
            time.sleep(0)

    @torch.inference_mode()
    def step(self):
        """Admit, prefill one chunk, decode one token for every sequence ready; drop the finished."""
        self.admit()
        if self.prefilling:
            self.prefill()
        if self.decoding:
            self.decode()
        self.steps += 1

    def admit(self):
        with self.wake:
            while self.waiting and self.free:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    sequence.on_finish("cancelled")
                    continue
                sequence.slot = self.free.pop(0)
                self.prefilling.append(sequence)

    def prefill(self):
        """The next chunk of every new prompt, padded to one length, in one forward pass."""
        # a copy to walk: a cancelled sequence leaves self.prefilling on the way
        batch = [s for s in list(self.prefilling) if not self.drop_if_cancelled(s, self.prefilling)]
        if not batch:
            return
        left = [len(s.prompt) - s.cached for s in batch]
        # at most prefill_chunk positions, and never past the context of any row (the padding writes too)
        T = min(self.prefill_chunk, max(left), min(self.block_size - s.cached for s in batch))
        tokens = torch.zeros((len(batch), T), dtype=torch.long)
        for i, s in enumerate(batch):
            chunk = s.prompt[s.cached : s.cached + T]
            tokens[i, : len(chunk)] = torch.tensor(chunk)
        # the padding after a short chunk lands in cache positions that the row overwrites before it reads them
        x = self.forward(tokens, batch)  # (B, T, C)
        for i, s in enumerate(batch):
            n = min(T, left[i])
            s.cached += n
            if s.cached == len(s.prompt):
                # the prompt is in the cache: its last position gives the first new token
                self.prefilling.remove(s)
                self.decoding.append(s)
                self.emit(s, s.next_token(self.model.lm_head(x[i : i + 1, n - 1])))

    def decode(self):
        """One new token for every decoding sequence, all rows in one forward pass."""
        # a copy to walk: a cancelled sequence leaves self.decoding on the way
        batch = [s for s in list(self.decoding) if not self.drop_if_cancelled(s, self.decoding)]
        if not batch:
            return
        tokens = torch.tensor([[s.tokens[-1]] for s in batch])  # (B, 1): each row's latest token
        logits = self.model.lm_head(self.forward(tokens, batch)[:, -1])  # (B, V)
        for i, s in enumerate(batch):
            s.cached += 1
            self.emit(s, s.next_token(logits[i : i + 1]))

    def forward(self, tokens, batch):
        """The model's hidden states for tokens (B, T), row i at position batch[i].cached in slot batch[i].slot."""
        slots = torch.tensor([s.slot for s in batch], device=self.device)
        pos = torch.tensor([s.cached for s in batch], device=self.device)
        # every layer reads keys up to the longest row's end: counted here once, not read back per layer
        end = max(s.cached for s in batch) + tokens.size(1)
        caches = [SlotCache(cache, slots, end) for cache in self.caches]
        return self.model.hidden_states(tokens.to(self.device), caches, pos)

    def emit(self, sequence, token):
        """Hands a new token to its caller, or ends the sequence on a stop token or at its limit."""
        if token in sequence.stop_tokens:
            return self.finish(sequence, "stop")
        sequence.tokens.append(token)
        sequence.on_token(token)
        # the latest token goes in at position cached to make the next one: it must fit in the context
        if len(sequence.tokens) >= sequence.max_tokens or sequence.cached >= self.block_size:
            self.finish(sequence, "length")

    def drop_if_cancelled(self, sequence, group):
        if sequence.cancelled:
            group.remove(sequence)
            self.release(sequence)
            sequence.on_finish("cancelled")
        return sequence.cancelled

    def finish(self, sequence, reason):
        (self.decoding if sequence in self.decoding else self.prefilling).remove(sequence)
        self.release(sequence)
        sequence.on_finish(reason)

    def release(self, sequence):
        with self.wake:
            self.free.append(sequence.slot)
            self.free.sort()
            sequence.slot = None


def step_seconds(model, rows, steps=10):
    """Median seconds of one engine step with `rows` sequences decoding, the engine's busiest case."""
    engine = Engine(model, max_batch=rows)
    quiet = dict(on_token=lambda token: None, on_finish=lambda reason: None)
    engine.submit(*[Sequence([1] * 8, 10**9, frozenset(), temperature=0.8, seed=i, **quiet) for i in range(rows)])
    # every sequence must last all the steps: 8 prompt positions, 4 untimed steps, the timed ones, within the context
    steps = max(1, min(steps, model.config.block_size - 8 - 4 - 1))
    # admit and prefill, then a few untimed steps
    for _ in range(4):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
