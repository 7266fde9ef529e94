"""
Continuous batching beneath serve.py: many requests share one model, one batched step at a time.

Decoding is memory-bound: a step reads every weight once whether it makes 1 token or 16, so
sequences decoded together cost little more than one alone (docs/serving.md). The engine
keeps up to max_batch sequences in the rows ("slots") of one KV cache, and loops:

    admit   requests waiting in the queue take free slots
    run     one forward pass for everyone: every sequence with its prompt in the cache feeds
            its latest token, every new one the next chunk of its prompt (at most
            prefill_chunk prompt positions a step, so a long prompt never stalls the others
            for long); each sequence whose prompt is now all cached makes a token
    finish  a sequence that is done (a stop token, max_tokens, the end of the context, or
            cancelled by its client) leaves at once and frees its slot for the next step

A step of decoding only is a batch of rows of one token, each at its own position (model.py's
per-row pos). A step with prompts in it packs every token into one row, as vLLM does, so
neither the decoding rows nor the short prompts are padded to the longest: each token has its
own position, and a mask keeps it to its own sequence's keys (model.py's per-token pos and a
mask passed down). New prompts and the others' decoding then pay one pass's fixed cost, not
two (docs/serving.md measures it).

Each sequence samples with its own settings and its own random generator, so its tokens do
not depend on what else runs beside it; one that asks for logprobs also gets each token's
log-probability under the model's own distribution (before its settings change the logits),
and with score_prompt its prompt's, from logits the prefill's forward pass makes beside the others. Each
sequence reports to its caller through on_token and on_finish. The engine is single-threaded:
whoever steps it also submits and cancels (serve.py runs it in a process of its own,
tensegpt/engine_process.py; eval.py in its own loop).
"""

import collections
import itertools
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from model import draw, next_token_probs, penalize_repetition


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
    # OpenAI's penalties on the tokens made so far, CTRL's on the prompt's and theirs (vLLM's extension), added biases
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = None  # {token id: added to its logit}
    min_tokens: int = 0  # the stop tokens are barred until this many tokens are made (vLLM's extension)
    # None: no log-probabilities; k: each new token's, and the k likeliest tokens' at its place (OpenAI's logprobs)
    logprobs: int = None
    score_prompt: bool = False  # with logprobs: the prompt's tokens' too, each after the ones before it (echo)
    on_token: callable = None  # on_token(token id), called where the engine steps
    on_finish: callable = None  # on_finish('stop', 'length', 'cancelled' or 'error')
    on_prompt_scored: callable = None  # with score_prompt: on_prompt_scored(prompt_scores), before the first token
    tokens: list = field(default_factory=list)  # the new tokens so far
    # with logprobs: for each new token, (its log-probability, [(token id, log-probability) of the k likeliest])
    scores: list = field(default_factory=list)
    prompt_scores: list = field(default_factory=list)  # with score_prompt: the same for prompt[1:]
    cached: int = 0  # positions of prompt + tokens held in the cache
    slot: int = None
    cancelled: bool = False
    id: int = None  # its name in the messages between the server's process and the engine's

    def settings(self):
        """What the engine needs to make it (no callbacks: they stay with the caller)."""
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, stop_tokens=self.stop_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias,
                    min_tokens=self.min_tokens, logprobs=self.logprobs, score_prompt=self.score_prompt)  # fmt: skip

    def adjusts_logits(self):
        penalized = self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        return bool(penalized or self.logit_bias or self.too_short_to_stop())

    def too_short_to_stop(self):
        return len(self.tokens) < self.min_tokens and bool(self.stop_tokens)

    def adjust(self, logits):
        """
        This sequence's logits (V,) after its penalties and biases, as vLLM applies them: a token made n times so far
        loses frequency_penalty * n, and presence_penalty once; a token of the prompt or made so far has its logit
        divided by repetition_penalty when positive, multiplied when negative; logit_bias adds to the tokens it names;
        short of min_tokens, the stop tokens are barred.
        """
        if self.tokens and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(self.tokens, device=logits.device), minlength=logits.size(-1))
            logits = logits - self.frequency_penalty * counts - self.presence_penalty * (counts > 0)
        if self.repetition_penalty != 1.0:
            seen = torch.tensor([self.prompt + self.tokens], device=logits.device)  # (1, T)
            logits = penalize_repetition(logits[None], seen, self.repetition_penalty)[0]
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            bias = torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.index_add(0, ids, bias)
        if self.too_short_to_stop():
            logits = logits.index_fill(0, torch.tensor(sorted(self.stop_tokens), device=logits.device), float("-inf"))
        return logits

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

    def update(self, input_pos, k, v):
        rows = self.slots[:, None]  # (B, 1)
        # indexing slots and positions (B, T) together puts them first: (B, T, n_kv_head, hs)
        self.cache.k[rows, :, input_pos] = k.transpose(1, 2)
        self.cache.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.cache.k[self.slots, :, : self.end], self.cache.v[self.slots, :, : self.end]


class PackedCache:
    """
    One layer's KV cache for a packed step (Engine.forward_packed): the step's tokens in one row, token j of the
    row belonging to batch row rows[j] at position input_pos[0, j]. It writes each token's key and value there and
    reads the keys of the batch's slots laid side by side in one row, end positions each, for the mask to pick from.
    """

    def __init__(self, cache, slots, rows, end):
        self.cache, self.slots, self.end = cache, slots, end
        self.slot_of_token = slots[rows]

    def update(self, input_pos, k, v):
        # (1, n_kv_head, N, hs) -> (N, n_kv_head, hs): indexing slots and positions together puts them first
        self.cache.k[self.slot_of_token, :, input_pos[0]] = k[0].transpose(0, 1)
        self.cache.v[self.slot_of_token, :, input_pos[0]] = v[0].transpose(0, 1)
        k, v = self.cache.k[self.slots, :, : self.end], self.cache.v[self.slots, :, : self.end]
        # (B, n_kv_head, end, hs) -> (1, n_kv_head, B * end, hs): the slots side by side
        return tuple(t.transpose(0, 1).flatten(1, 2)[None] for t in (k, v))


class Engine:
    def __init__(self, model, max_batch=16, max_queue=64, prefill_chunk=256):
        self.model, self.block_size = model, model.config.block_size
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.device = next(model.parameters()).device
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

    def step_or_fail(self):
        """One step; a fault in it (out of memory, say) ends the sequences in flight with an error, not the caller."""
        try:
            self.step()
        except Exception as e:
            print(f"engine: a step failed ({e.__class__.__name__}: {e}); its sequences end with an error",
                  file=sys.stderr, flush=True)  # fmt: skip
            for sequence in self.prefilling + self.decoding:
                self.finish(sequence, "error")

    @torch.inference_mode()
    def step(self):
        """Admit, then one forward pass: a token for every decoding sequence, the next chunk of every new prompt."""
        self.admit()
        # a copy to walk: a cancelled sequence leaves its group on the way
        decoding = [s for s in list(self.decoding) if not self.drop_if_cancelled(s, self.decoding)]
        prefilling = [s for s in list(self.prefilling) if not self.drop_if_cancelled(s, self.prefilling)]
        # what each sequence feeds this step: its latest token, or its prompt's next chunk
        batch = [(s, [s.tokens[-1]]) for s in decoding]
        budget = self.prefill_chunk
        for s in prefilling:
            # at most prefill_chunk prompt positions a step in all, and never past the context
            n = min(len(s.prompt) - s.cached, budget, self.block_size - s.cached)
            if n > 0:
                batch.append((s, s.prompt[s.cached : s.cached + n]))
                budget -= n
        if batch:
            self.run(batch)
        self.steps += 1

    def admit(self):
        while self.waiting and self.free:
            sequence = self.waiting.popleft()
            if sequence.cancelled:
                sequence.on_finish("cancelled")
                continue
            sequence.slot = self.free.pop(0)
            self.prefilling.append(sequence)

    def run(self, batch):
        """
        One forward pass over batch [(sequence, the tokens it feeds)], then a token for every sequence whose feed
        ends its prompt or is its latest token. Every row decoding: a batch of rows of one token. With prompt chunks
        in it: every token in one row, packed, so no row is padded to the longest chunk. The model makes the logits
        of the fed tokens that need them only: each sequence's last, and the prompt's own where it is scored.
        """
        starts = [0, *itertools.accumulate(len(tokens) for _, tokens in batch)]  # each feed's first token
        ready = [i for i, (s, tokens) in enumerate(batch) if s.cached + len(tokens) >= len(s.prompt)]
        # with score_prompt, each fed prompt token that has a next prompt token is scored by its logits
        scored = {
            i: s.prompt[s.cached + 1 : s.cached + 1 + len(tokens)]
            for i, (s, tokens) in enumerate(batch)
            if s.score_prompt and s.logprobs is not None and s.cached < len(s.prompt)
        }
        logits_at = [starts[i] + j for i, targets in scored.items() for j in range(len(targets))]
        logits_at += [starts[i + 1] - 1 for i in ready]
        if all(len(tokens) == 1 for _, tokens in batch):
            logits = self.forward_rows(batch, logits_at)
        else:
            logits = self.forward_packed(batch, logits_at)
        # (N, V): the scored prompts' rows first, then one row per ready sequence
        done = 0
        for i, targets in scored.items():
            self.score_prompt(batch[i][0], logits[done : done + len(targets)], targets, len(batch[i][1]))
            done += len(targets)
        for s, tokens in batch:
            s.cached += len(tokens)
        if not ready:
            return
        sequences, logits = [batch[i][0] for i in ready], logits[done:]
        # the model's own distribution, before sample applies temperature, penalties and biases to the logits
        log_probs = self.log_probs(sequences, logits)
        tokens = self.sample(sequences, logits)
        for i, (s, token) in enumerate(zip(sequences, tokens, strict=True)):
            if s in self.prefilling:
                # the prompt is in the cache: its last position gave the first new token
                self.prefilling.remove(s)
                self.decoding.append(s)
            self.emit(s, token, None if log_probs[i] is None else score(log_probs[i], token, s.logprobs))

    def forward_rows(self, batch, logits_at):
        """The logits (N, V) at logits_at of one token a row: row i at position cached in its sequence's slot."""
        slots = torch.tensor([s.slot for s, _ in batch], device=self.device)
        input_pos = torch.tensor([[s.cached] for s, _ in batch], device=self.device)  # (B, 1)
        tokens = torch.tensor([t for _, t in batch], device=self.device)  # (B, 1)
        # every layer reads keys up to the longest row's end: counted here once, not read back per layer
        end = max(s.cached for s, _ in batch) + 1
        caches = [SlotCache(c, slots, end) for c in self.caches]
        at = torch.tensor(logits_at, device=self.device)
        return self.model(tokens, caches=caches, input_pos=input_pos, logits_at=at)[0]

    def forward_packed(self, batch, logits_at):
        """
        Every fed token in one row (1, N): the logits (N', V) at logits_at, indices into the N tokens. Token j of
        sequence i sits at position cached + j of slot i; the mask lets it see that slot's keys up to its position.
        """
        tokens, rows, input_pos = [], [], []
        for i, (s, fed) in enumerate(batch):
            tokens += fed
            rows += [i] * len(fed)
            input_pos += range(s.cached, s.cached + len(fed))
        rows, input_pos = torch.tensor(rows, device=self.device), torch.tensor([input_pos], device=self.device)
        slots = torch.tensor([s.slot for s, _ in batch], device=self.device)
        end = int(input_pos.max()) + 1
        # the keys of all B slots side by side, end positions each: key k is position k % end of row k // end
        key_rows = torch.arange(len(batch), device=self.device).repeat_interleave(end)  # (B * end,)
        key_positions = torch.arange(end, device=self.device).repeat(len(batch))  # (B * end,)
        mask = (key_rows == rows[:, None]) & (key_positions <= input_pos[0, :, None])  # (N, B * end)
        caches = [PackedCache(c, slots, rows, end) for c in self.caches]
        tokens = torch.tensor([tokens], device=self.device)  # (1, N)
        at = torch.tensor(logits_at, device=self.device)
        return self.model(tokens, caches=caches, input_pos=input_pos, mask=mask[None, None], logits_at=at)[0]

    def score_prompt(self, sequence, logits, targets, fed):
        """
        Scores the prompt tokens that follow the chunk a sequence feeds this step, from the logits (n, V) of the
        chunk's positions before them: what the model gave each prompt token after the ones before it. Once the
        prompt is scored to its last token, sequence.on_prompt_scored(prompt_scores).
        """
        if targets:
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
            for row, target in zip(log_probs, targets, strict=True):
                sequence.prompt_scores.append(score(row, target, sequence.logprobs))
        # the chunk that ends the prompt (whose last position gives the first new token) ends its scores
        if sequence.cached + fed >= len(sequence.prompt) and sequence.on_prompt_scored:
            sequence.on_prompt_scored(sequence.prompt_scores)

    def log_probs(self, batch, logits):
        """Each row's log-probabilities (V,), float32, for the sequences that asked for them; None for the others."""
        rows = [i for i, s in enumerate(batch) if s.logprobs is not None]
        if not rows:
            return [None] * len(batch)
        chosen = dict(zip(rows, torch.log_softmax(logits[rows].float(), dim=-1), strict=True))
        return [chosen.get(i) for i in range(len(batch))]

    def sample(self, batch, logits):
        """
        The next token of every row of logits (B, V), each with its own sequence's settings and random generator, so
        that a row draws what it would draw alone. Temperature 0: the most likely token. Penalties and biases first.
        """
        for i, s in enumerate(batch):
            if s.adjusts_logits():
                logits[i] = s.adjust(logits[i])
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

    def emit(self, sequence, token, scored=None):
        """Hands a new token (and its score) to its caller, or ends the sequence on a stop token or at its limit."""
        if token in sequence.stop_tokens:
            return self.finish(sequence, "stop")
        sequence.tokens.append(token)
        if scored is not None:
            sequence.scores.append(scored)
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


def score(log_probs, token, k):
    """(the token's log-probability, [(id, log-probability) of the k likeliest tokens]) from log_probs (V,)."""
    top = torch.topk(log_probs, min(k, log_probs.numel()))
    return float(log_probs[token]), list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


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


def compile_model(model):
    """
    torch.compile the model for the engine, from outside (nn.Module.compile): one graph for every batch and length
    (dynamic shapes). It breaks where forward reads the longest position back to check it against the context
    (.item()), as it must; dynamo's warning about that break would only alarm, so it is silenced.
    """
    logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)
    model.compile(dynamic=True)


def warm_up(engine):
    """
    Runs made-up requests through every kind of step the engine takes (one row decoding, several, a packed pass
    with and without decoding rows), so that a compiled model compiles before the first real request.
    """
    quiet = dict(stop_tokens=frozenset(), temperature=0, on_token=lambda token: None, on_finish=lambda reason: None)
    engine.submit(Sequence([0, 1, 2], max_tokens=4, **quiet))
    engine.step()
    engine.step()
    engine.submit(*[Sequence([0] * n, max_tokens=4, **quiet) for n in (3, 5)])
    while engine.pending():
        engine.step()
