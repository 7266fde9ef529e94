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
not depend on what else runs beside it. Each sequence reports to its caller through on_token
and on_finish. The engine is single-threaded: whoever steps it also submits and cancels
(serve.py runs it in a process of its own, tensegpt/engine_process.py; eval.py in its own loop).
"""

import collections
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from model import draw, next_token_probs, positions_from


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
    on_token: callable = None  # on_token(token id), called where the engine steps
    on_finish: callable = None  # on_finish('stop', 'length', 'cancelled' or 'error')
    tokens: list = field(default_factory=list)  # the new tokens so far
    cached: int = 0  # positions of prompt + tokens held in the cache
    slot: int = None
    cancelled: bool = False
    id: int = None  # its name in the messages between the server's process and the engine's

    def settings(self):
        """What the engine needs to make it (no callbacks: they stay with the caller)."""
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, stop_tokens=self.stop_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)  # fmt: skip

    def __post_init__(self):
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)


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
        self.steps = 0

    def submit(self, *sequences):
        """Queues sequences (all or none); QueueFull when more than max_queue would wait."""
        if len(self.waiting) + len(sequences) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue={self.max_queue})")
        self.waiting.extend(sequences)

    def cancel(self, sequence):
        """The client is gone: the sequence leaves at the next step and frees its slot."""
        sequence.cancelled = True

    def pending(self):
        """Whether any sequence is waiting for a slot or in one."""
        return bool(self.waiting or self.prefilling or self.decoding)

    def busy_slots(self):
        return self.max_batch - len(self.free)

    def step_or_fail(self, between=None):
        """One step; a fault in it (out of memory, say) ends the sequences in flight with an error, not the caller."""
        try:
            self.step(between)
        except Exception as e:
            print(f"engine: a step failed ({e.__class__.__name__}: {e}); its sequences end with an error",
                  file=sys.stderr, flush=True)  # fmt: skip
            for sequence in self.prefilling + self.decoding:
                self.finish(sequence, "error")

    @torch.inference_mode()
    def step(self, between=None):
        """
        Admit, prefill one chunk, decode one token for every sequence ready; drop the finished. between(): called
        after the prompts' pass, before the decoding pass (serve.py's engine process sends the first tokens then).
        """
        self.admit()
        if self.prefilling:
            self.prefill()
            if between:
                between()
        if self.decoding:
            self.decode()
        self.steps += 1

    def admit(self):
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
        done, last = [], []
        for i, s in enumerate(batch):
            n = min(T, left[i])
            s.cached += n
            if s.cached == len(s.prompt):
                # the prompt is in the cache: its last position gives the first new token
                done.append(s)
                last.append(x[i, n - 1])
        if not done:
            return
        tokens = self.sample(done, self.model.lm_head(torch.stack(last)))  # (D, C) -> (D, V) -> D tokens
        for s, token in zip(done, tokens):
            self.prefilling.remove(s)
            self.decoding.append(s)
            self.emit(s, token)

    def decode(self):
        """One new token for every decoding sequence, all rows in one forward pass."""
        # a copy to walk: a cancelled sequence leaves self.decoding on the way
        batch = [s for s in list(self.decoding) if not self.drop_if_cancelled(s, self.decoding)]
        if not batch:
            return
        tokens = torch.tensor([[s.tokens[-1]] for s in batch])  # (B, 1): each row's latest token
        logits = self.model.lm_head(self.forward(tokens, batch)[:, -1])  # (B, V)
        for s, token in zip(batch, self.sample(batch, logits)):
            s.cached += 1
            self.emit(s, token)

    def sample(self, batch, logits):
        """
        The next token of every row of logits (B, V), each with its own sequence's settings and random generator, so
        that a row draws what it would draw alone. Temperature 0: the most likely token.
        """
        tokens = logits.argmax(dim=-1)  # (B,)
        # the rows that draw, grouped by filter: one softmax and one search per group, not per row
        groups = collections.defaultdict(list)
        for i, s in enumerate(batch):
            if s.temperature > 0:
                groups[s.top_k, s.top_p].append(i)
        for (top_k, top_p), rows in groups.items():
            temperature = torch.tensor([[batch[i].temperature] for i in rows], device=logits.device)  # (n, 1)
            probs = next_token_probs(logits[rows], temperature, top_k, top_p)  # (n, V)
            # each row's uniform number from its own generator (on the CPU, where Sequence makes it)
            u = torch.cat([torch.rand((1, 1), generator=batch[i].generator) for i in rows])  # (n, 1)
            tokens[rows] = draw(probs, u=u.to(logits.device)).squeeze(1)
        return tokens.tolist()

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
