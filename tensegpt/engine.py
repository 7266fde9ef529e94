"""
Continuous batching beneath serve.py: many sequences share one model, one batched step at a
time (nano-vllm's llm_engine.py). Decoding is memory-bound: a step reads every weight once
whether it makes 1 token or 16, so sequences decoded together cost little more than one alone.

    step()   the scheduler picks the batch (tensegpt/scheduler.py), the runner makes its
             logits in one forward pass (tensegpt/runner.py), the sampler picks each ready
             sequence's token (tensegpt/sampler.py), and the step returns its Outputs

A sequence's tokens never depend on what runs beside it: its own position and keys, its own
settings and generator. A step that fails is run again one sequence at a time, so only a
sequence that fails alone ends with an error. The engine is single-threaded: whoever steps it
also submits and cancels. serve.py runs it in a process of its own (tensegpt/engine_process.py,
the same five methods); eval.py steps it in its own loop.
"""

import itertools
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from tensegpt import sampler
from tensegpt.runner import Runner
from tensegpt.scheduler import Scheduler
from tensegpt.sequence import Sampling, Sequence


@dataclass
class Output:
    """What a step tells a sequence's caller: a new token (with its score), the prompt's scores, or its end."""

    id: int
    token: int | None = None
    score: tuple | None = None
    prompt_scores: list | None = None
    # 'stop', 'length', 'cancelled' or 'error'; with a token: the sequence ended at it
    finish: str | None = None
    # ended by a stop token: which (its score, with logprobs, in score)
    stop_token: int | None = None
    # with 'error': what failed
    error: str | None = None


class Engine:
    def __init__(self, model, max_batch=16, max_queue=64, prefill_chunk=256):
        self.block_size, self.max_batch, self.max_queue = model.config.block_size, max_batch, max_queue
        self.scheduler = Scheduler(max_batch, max_queue, prefill_chunk, self.block_size)
        self.runner = Runner(model, max_batch)
        self.steps = 0

    def submit(self, *sequences):
        """Queues sequences (all or none); QueueFull when more than max_queue would wait."""
        self.scheduler.submit(*sequences)

    def cancel(self, sequence):
        """The client is gone: the sequence leaves at the next step and frees its slot."""
        sequence.cancelled = True

    def pending(self):
        return self.scheduler.pending()

    def busy_slots(self):
        return self.scheduler.busy_slots()

    @torch.inference_mode()
    def step(self):
        """One forward pass for every sequence in a slot: what each one got, as Outputs."""
        outputs = [Output(s.id, finish="cancelled") for s in self.scheduler.cancelled()]
        batch = self.scheduler.schedule()
        if batch:
            try:
                outputs += self.run(batch)
            except Exception as e:
                print(f"engine: a step failed ({e.__class__.__name__}: {e}); running its sequences one at a time",
                      file=sys.stderr, flush=True)  # fmt: skip
                outputs += self.run_apart(batch)
        self.steps += 1
        return outputs

    def run_apart(self, batch):
        """A failed step again, one sequence at a time: a sequence that fails alone ends with an error."""
        outputs = []
        for fed in batch:
            try:
                outputs += self.run([fed])
            except Exception as e:
                cause = f"{e.__class__.__name__}: {e}"
                print(f"engine: sequence {fed[0].id} failed alone ({cause}); it ends with an error",
                      file=sys.stderr, flush=True)  # fmt: skip
                ended = self.end(fed[0], "error")
                ended.error = cause
                outputs.append(ended)
        return outputs

    def run(self, batch):
        """
        One forward pass over batch [(sequence, the tokens it feeds)], then a token for each sequence whose feed ends
        its prompt or is its latest token. The model makes the logits of the fed tokens that need them only: each
        ready sequence's last, and the prompt's own where they are scored (echo with logprobs).
        """
        starts = [0, *itertools.accumulate(len(fed) for _, fed in batch)]
        ready = [i for i, (s, fed) in enumerate(batch) if s.cached + len(fed) >= len(s.prompt)]
        # with score_prompt, each fed prompt token that has a next prompt token is scored by its logits
        targets = {
            i: s.prompt[s.cached + 1 : s.cached + 1 + len(fed)]
            for i, (s, fed) in enumerate(batch)
            if s.score_prompt and s.logprobs is not None and s.cached < len(s.prompt)
        }
        logits_at = [starts[i] + j for i, t in targets.items() for j in range(len(t))]
        logits_at += [starts[i + 1] - 1 for i in ready]
        # (N, V): the scored prompts' rows first, then one row per ready sequence
        logits = self.runner.logits(batch, logits_at)
        # everything is worked out before anything changes, so that a step that fails can be run again
        prompt_scores, done = {}, 0
        for i, t in targets.items():
            log_probs = torch.log_softmax(logits[done : done + len(t)].float(), dim=-1)  # (n, V)
            prompt_scores[i] = [sampler.score(row, target, batch[i][0].logprobs) for row, target in zip(log_probs, t)]
            done += len(t)
        sequences = [batch[i][0] for i in ready]
        tokens = sampler.sample(sequences, logits[done:])
        scores = sampler.scores(sequences, logits[done:], tokens)
        outputs = []
        for i, (s, fed) in enumerate(batch):
            s.cached += len(fed)
            if i in prompt_scores:
                s.prompt_scores += prompt_scores[i]
                # the chunk that ends the prompt ends its scores, before its first token
                if s.cached >= len(s.prompt):
                    outputs.append(Output(s.id, prompt_scores=s.prompt_scores))
        outputs += [self.emit(s, token, score) for s, token, score in zip(sequences, tokens, scores, strict=True)]
        return outputs

    def emit(self, sequence, token, score):
        """A new token (and its score), or the end on a stop token; at its limit, the token ends it."""
        if sequence.max_tokens == 0:
            # echo with max_tokens 0: the prompt scored, nothing made
            return self.end(sequence, "length")
        if token in sequence.stop_tokens:
            sequence.stop_scored = None if score is None else (token, score)
            ended = self.end(sequence, "stop")
            ended.stop_token, ended.score = token, score
            return ended
        sequence.tokens.append(token)
        if score is not None:
            sequence.scores.append(score)
        output = Output(sequence.id, token=token, score=score)
        # the latest token goes in at position cached to make the next one: it must fit in the context
        if len(sequence.tokens) >= sequence.max_tokens or sequence.cached >= self.block_size:
            self.scheduler.finish(sequence)
            output.finish = "length"
        return output

    def end(self, sequence, reason):
        self.scheduler.finish(sequence)
        return Output(sequence.id, finish=reason)


def step_seconds(model, rows, steps=10):
    """Median seconds of one engine step with `rows` sequences decoding, the engine's busiest case."""
    engine = Engine(model, max_batch=rows)
    drawn = [Sampling(temperature=0.8, seed=i) for i in range(rows)]
    engine.submit(*[Sequence([1] * 8, 10**9, sampling=s) for s in drawn])
    # every sequence must last all the steps: 8 prompt positions, 4 untimed steps, the timed ones, within the context
    steps = max(1, min(steps, model.config.block_size - 8 - 4 - 1))
    for _ in range(4):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_up(engine):
    """
    Runs made-up sequences through every kind of step the engine takes (one row decoding, several, a packed pass
    with and without decoding rows), so that a compiled model compiles before the first real request.
    """
    greedy = Sampling(temperature=0)
    engine.submit(Sequence([0, 1, 2], max_tokens=4, sampling=greedy))
    engine.step()
    engine.step()
    engine.submit(*[Sequence([0] * n, max_tokens=4, sampling=greedy) for n in (3, 5)])
    while engine.pending():
        engine.step()
