"""
A sequence as the serving engine holds it (nano-vllm's sequence.py): its prompt, how each
token is picked (Sampling: the fields of OpenAI's API, listed once, here), and where it stands.
check_sampling is the one set of rules those fields pass, in serve.py and sample.py alike.
"""

import itertools
from dataclasses import dataclass, field

import torch

# a temperature below this picks the most likely token: dividing by it would overflow the logits (as vLLM does)
MIN_TEMPERATURE = 1e-5


@dataclass
class Sampling:
    """How each token is picked. serve.py's request bodies take these fields by these names (docs/serving.md)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    # OpenAI's penalties on the tokens made so far, CTRL's on the prompt's and theirs (vLLM's extension)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # {token id: added to its logit}
    logit_bias: dict[int, float] | None = None
    # the stop tokens are barred until this many tokens are made (vLLM's extension)
    min_tokens: int = 0

    def greedy(self):
        return self.temperature < MIN_TEMPERATURE

    def kept(self):
        """top_k as the model's filter takes it: None keeps every token (so do 0 and -1, as vLLM reads them)."""
        return self.top_k if self.top_k and self.top_k > 0 else None


class SettingError(ValueError):
    """A sampling field out of its range; name is the field's, the message starts with it."""

    def __init__(self, name, problem, value):
        super().__init__(f"{name} {problem}; got {value!r}")
        self.name = name


def whole(n):
    return isinstance(n, int) and not isinstance(n, bool)


# each field's range: a value inside it is one the arithmetic carries (docs/serving.md lists them)
RULES = {
    "temperature": (lambda t: 0.0 <= t <= 2.0, "must be between 0 and 2 (below 1e-5: the most likely token)"),
    "top_k": (lambda k: k is None or (whole(k) and k >= -1), "must be a whole number >= 1 (0 or -1: every token)"),
    "top_p": (lambda p: 0.0 < p <= 1.0, "must be in (0, 1] (1: every token)"),
    "seed": (lambda s: s is None or (whole(s) and 0 <= s < 2**63), "must be a whole number from 0 to 2**63 - 1"),
    "presence_penalty": (lambda p: -2.0 <= p <= 2.0, "must be between -2 and 2"),
    "frequency_penalty": (lambda p: -2.0 <= p <= 2.0, "must be between -2 and 2"),
    "repetition_penalty": (lambda p: 0.01 <= p <= 100.0, "must be between 0.01 and 100 (1: off)"),
}


def check_sampling(sampling, vocab_size=None, max_tokens=None):
    """Refuses the first field out of its range with a SettingError naming it. NaN is in no range."""
    for name, (ok, problem) in RULES.items():
        value = getattr(sampling, name)
        if not ok(value):
            raise SettingError(name, problem, value)
    for token, bias in (sampling.logit_bias or {}).items():
        if not (0 <= token < vocab_size and -100.0 <= bias <= 100.0):
            problem = f"maps token ids (0 to {vocab_size - 1}) to -100 ... 100"
            raise SettingError("logit_bias", problem, {token: bias})
    if not 0 <= sampling.min_tokens <= (max_tokens or sampling.min_tokens):
        raise SettingError("min_tokens", "must be 0 or more, and no more than max_tokens", sampling.min_tokens)


new_id = itertools.count().__next__


@dataclass
class Sequence:
    """One generation: a prompt, how to sample it, what to report, and where it stands."""

    prompt: list
    max_tokens: int
    stop_tokens: frozenset = frozenset()
    sampling: Sampling = field(default_factory=Sampling)
    # None: no log-probabilities; k: each new token's, and the k likeliest tokens' at its place (OpenAI's logprobs)
    logprobs: int | None = None
    # with logprobs: the prompt's tokens' too, each after the ones before it (echo)
    score_prompt: bool = False
    id: int = field(default_factory=new_id)
    # where it stands: the new tokens so far; with logprobs, each one's (log-probability, [(id, lp) of the k likeliest])
    tokens: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    # with score_prompt: the same for prompt[1:]
    prompt_scores: list = field(default_factory=list)
    # with logprobs, ended by a stop token: (that token, its score), as vLLM lists it after the new tokens
    stop_scored: tuple | None = None
    # positions of prompt + tokens held in the cache, and the cache's row
    cached: int = 0
    slot: int = None
    cancelled: bool = False

    def __post_init__(self):
        seed = self.sampling.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def request(self):
        """What another process needs to make it again: the fields given, none of where it stands."""
        given = ("prompt", "max_tokens", "stop_tokens", "sampling", "logprobs", "score_prompt", "id")
        return {name: getattr(self, name) for name in given}
