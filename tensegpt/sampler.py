"""
The serving engine's sampler (nano-vllm's sampler.py): from the logits of a step's rows to
each row's next token, with its own sequence's settings and random generator, so that a row
draws what it would draw alone; and the log-probabilities a request asked for.
"""

import collections

import torch

from model import draw, next_token_probs, penalize_repetition


def adjust(sequence, logits):
    """
    A sequence's logits (V,) after its penalties and biases, as vLLM applies them: a token made n times so far loses
    frequency_penalty * n, and presence_penalty once; a token of the prompt or made so far has its logit divided by
    repetition_penalty when positive, multiplied when negative; logit_bias adds to the tokens it names; short of
    min_tokens, the stop tokens are barred.
    """
    s = sequence.sampling
    if sequence.tokens and (s.presence_penalty or s.frequency_penalty):
        counts = torch.bincount(torch.tensor(sequence.tokens, device=logits.device), minlength=logits.size(-1))
        logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
    if s.repetition_penalty != 1.0:
        seen = torch.tensor([sequence.prompt + sequence.tokens], device=logits.device)  # (1, T)
        logits = penalize_repetition(logits[None], seen, s.repetition_penalty)[0]
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias), device=logits.device)
        bias = torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, bias)
    if too_short_to_stop(sequence):
        barred = torch.tensor(sorted(sequence.stop_tokens), device=logits.device)
        logits = logits.index_fill(0, barred, float("-inf"))
    return logits


def too_short_to_stop(sequence):
    return len(sequence.tokens) < sequence.sampling.min_tokens and bool(sequence.stop_tokens)


def adjusts(sequence):
    s = sequence.sampling
    penalized = s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0
    return bool(penalized or s.logit_bias or too_short_to_stop(sequence))


def sample(sequences, logits):
    """
    The next token of every row of logits (B, V), row i with sequences[i]'s settings and generator. Greedy rows take
    the most likely token; the rows that draw are grouped by filter: one softmax and one search per group, not per row.
    """
    if any(adjusts(s) for s in sequences):
        logits = torch.stack([adjust(s, row) if adjusts(s) else row for s, row in zip(sequences, logits, strict=True)])
    tokens = logits.argmax(dim=-1)  # (B,)
    groups = collections.defaultdict(list)
    for i, s in enumerate(sequences):
        if not s.sampling.greedy():
            groups[s.sampling.kept(), s.sampling.top_p].append(i)
    for (top_k, top_p), rows in groups.items():
        temperature = torch.tensor([[sequences[i].sampling.temperature] for i in rows], device=logits.device)
        probs = next_token_probs(logits[rows], temperature, top_k, top_p)  # (n, V)
        # each row's uniform number from its own generator (on the CPU, where Sequence makes it)
        u = torch.cat([torch.rand((1, 1), generator=sequences[i].generator) for i in rows])  # (n, 1)
        tokens[rows] = draw(probs, u=u.to(logits.device)).squeeze(1)
    return tokens.tolist()


def scores(sequences, logits, tokens):
    """For each row that asked for logprobs, its token's score under the model's own distribution; None for others."""
    return [
        None if s.logprobs is None else score(torch.log_softmax(row.float(), dim=-1), token, s.logprobs)
        for s, row, token in zip(sequences, logits, tokens, strict=True)
    ]


def score(log_probs, token, k):
    """(the token's log-probability, [(id, log-probability) of the k likeliest tokens]) from log_probs (V,)."""
    top = torch.topk(log_probs, min(k, log_probs.numel()))
    return float(log_probs[token]), list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
