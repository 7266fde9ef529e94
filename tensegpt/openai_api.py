"""
OpenAI's shapes beneath serve.py's routes: the request bodies (pydantic), a request turned
into the engine's Sequences, and one request's Generation: its sequences' tokens turned into
text as they come, then into OpenAI's answer, whole or as server-sent events. Anything wrong
with a request is answered in OpenAI's error shape (tensegpt/http_checks.py installs it):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": ...}}
"""

import asyncio
import json
import sys
import time
import uuid
from dataclasses import fields, replace
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, create_model, model_validator

from tensegpt.scheduler import QueueFull
from tensegpt.sequence import Sampling, Sequence, SettingError, check_sampling

# alternatives a token at most, as vLLM allows by default
MAX_LOGPROBS = 20


class ApiError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ----------------------------------------------------------------------------- requests


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # 'developer' is what OpenAI's newer clients call the system message
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self):
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


# the sampling fields as the engine's Sampling lists them, with their defaults; logit_bias's keys as JSON has them
SamplingFields = create_model(
    "SamplingFields",
    **{f.name: (f.type, f.default) for f in fields(Sampling) if f.name != "logit_bias"},
    logit_bias=(dict[str, float], {}),
)


class Body(SamplingFields):
    """The fields both endpoints share. Fields that OpenAI's clients send and this server has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension, which its benchmarks send: no stop token at all
    ignore_eos: bool = False
    # chat: true, with top_logprobs alternatives a token; completions: the number of alternatives (0 to 20)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, fields):
        # some clients send every field, null where they leave it at its default: OpenAI reads null so
        return {k: v for k, v in fields.items() if v is not None} if isinstance(fields, dict) else fields


class ChatRequest(Body):
    messages: list[Message]


class CompletionRequest(Body):
    # a text, several, a text's token ids, or several of those (as OpenAI's API takes them)
    prompt: str | list[str] | list[int] | list[list[int]]
    # the prompt's text before each choice's
    echo: bool = False


class TokenizeRequest(BaseModel):
    model: str | None = None
    # a text, or a chat through the template up to the assistant's turn
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# the end-of-text marker as text, which a completions prompt may hold (lm-evaluation-harness starts texts with it)
END_OF_TEXT = "<|endoftext|>"


def encode_text(tokenizer, text):
    """A completions prompt's tokens as vLLM reads it: '<|endoftext|>' in it is the end-of-text token, the rest text."""
    ids = []
    for i, part in enumerate(text.split(END_OF_TEXT)):
        ids += ([tokenizer.eot] if i else []) + tokenizer.encode(part)
    return ids


def check_token_ids(ids, vocab_size, param):
    """Refuses, naming param, token ids outside the vocabulary: the first such id, not the largest."""
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ApiError(400, f"{param}: token ids go from 0 to {vocab_size - 1}; got {outside[0]}", param)


def sampling_of(body, vocab_size, max_tokens):
    """The body's Sampling, checked by the rules sample.py's options pass too."""
    bias = {}
    for key, value in body.logit_bias.items():
        # ASCII digits only: str.isdigit also takes superscripts and circled digits, which int() refuses
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias maps token ids to -100 ... 100; got the key {key!r}", "logit_bias")
        bias[int(key)] = value
    sampling = Sampling(**{f.name: getattr(body, f.name) for f in fields(Sampling)} | {"logit_bias": bias or None})
    try:
        check_sampling(sampling, vocab_size, max_tokens)
    except SettingError as e:
        raise ApiError(400, str(e), e.name) from None
    return sampling


def requested_logprobs(body, chat):
    """
    How many alternatives a token the request wants with its log-probabilities, None for none. Chat (OpenAI's chat
    API): logprobs true, top_logprobs 0 to 20. Completions (the legacy API): logprobs, an integer 0 to 20.
    """
    name, k = ("top_logprobs", body.top_logprobs) if chat else ("logprobs", body.logprobs)
    if chat and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    if k is not None and k is not False and not 0 <= int(k) <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be between 0 and {MAX_LOGPROBS}; got {k}", name)
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else None
    return None if k is None or k is False else int(k)


def sequences_of(body, prompts, stop_tokens, block_size, vocab_size, max_queue):
    """
    The request's sequences, n for each prompt (choice i * n + j is prompt i's j-th, as OpenAI numbers them), each
    seeded seed + its choice; refused when they would not fit the context or the queue.
    """
    chat = isinstance(body, ChatRequest)
    prompt_param = "messages" if chat else "prompt"
    # echo with max_tokens 0 scores the prompt and makes nothing (what evaluation tools send, as vLLM takes it)
    echo = getattr(body, "echo", False)
    scores_only = echo and body.max_tokens == 0 and body.max_completion_tokens is None
    for name, value in (("max_tokens", body.max_tokens), ("max_completion_tokens", body.max_completion_tokens)):
        if value is not None and value < 1 and not scores_only:
            raise ApiError(400, f"{name} must be at least 1 (0 only with echo); got {value!r}", name)
    if not 1 <= body.n <= max_queue:
        raise ApiError(400, f"n must be between 1 and {max_queue}; got {body.n!r}", "n")
    if len(prompts) * body.n > max_queue:
        message = (f"{len(prompts)} prompts with n={body.n} are more sequences than one request may start "
                   f"({max_queue}, --max_queue): send fewer")  # fmt: skip
        raise ApiError(400, message, prompt_param)
    longest = max(len(p) for p in prompts)
    room = block_size - longest
    if room < 1:
        message = f"the prompt is {longest} tokens; this model's context is {block_size}: shorten it"
        raise ApiError(400, message, prompt_param, "context_length_exceeded")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > room:
        message = (f"max_tokens {max_tokens} and the prompt's {longest} tokens are more than this model's context of "
                   f"{block_size}: ask for at most {room}")  # fmt: skip
        raise ApiError(400, message, "max_tokens", "context_length_exceeded")
    sampling = sampling_of(body, vocab_size, max_tokens)
    logprobs = requested_logprobs(body, chat)
    # left out, max_tokens is all the context leaves: the engine ends each sequence at the context's end
    given = dict(max_tokens=0 if scores_only else max_tokens or block_size, logprobs=logprobs,
                 stop_tokens=frozenset() if body.ignore_eos else stop_tokens,
                 score_prompt=echo and logprobs is not None)  # fmt: skip

    def seeded(choice):
        return sampling if sampling.seed is None else replace(sampling, seed=(sampling.seed + choice) % 2**63)

    choices = [p for p in prompts for _ in range(body.n)]
    return [Sequence(prompt, sampling=seeded(i), **given) for i, prompt in enumerate(choices)]


def stop_strings(body):
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(s == "" for s in stop):
        raise ApiError(400, f"stop must be at most 4 non-empty strings; got {body.stop!r}", "stop")
    return stop


# ----------------------------------------------------------------------------- one request's generation


class StopToken(int):
    """The id of the stop token that ended a choice, in its logprobs: its text is empty, it is not in the answer."""


class Generation:
    """
    The sequences of one request, from the engine (its Outputs, handed to put() on the event loop) to the client:
    events() yields (choice, new text, finish reason or None) as the tokens come. Text is held back while it could
    still be the start of a stop string or ends inside a character. answer() and stream() shape it as OpenAI does.
    """

    def __init__(self, engine, tokenizer, sequences, n, stop, model_name, chat, echoes=None):
        self.engine, self.tokenizer, self.sequences, self.stop = engine, tokenizer, sequences, stop
        self.model_name, self.chat = model_name, chat
        self.choice_of = {s.id: i for i, s in enumerate(sequences)}
        self.queue, self.id, self.created = asyncio.Queue(), uuid.uuid4().hex[:24], int(time.time())
        # each prompt once, whatever n, as OpenAI counts them
        self.prompt_tokens = sum(len(s.prompt) for s in sequences[::n])
        choices = len(sequences)
        self.echoes = echoes or [""] * choices
        self.texts, self.shown, self.done = [""] * choices, [0] * choices, [None] * choices
        self.counted, self.scored = [0] * choices, [0] * choices
        # choice -> what failed, for a choice that ended with an error
        self.errors = {}
        # echo with logprobs: the prompt's tokens and scores come first in each choice's logprobs
        self.prompt_given = [not s.score_prompt for s in sequences]
        # ended by a stop token, with logprobs: its entry handed out
        self.stop_given = [False] * choices
        try:
            engine.submit(*sequences)
        except QueueFull as e:
            message = f"the server is busy: {e}; try again shortly"
            raise ApiError(503, message, kind="server_error", code="overloaded") from None

    def put(self, output):
        self.queue.put_nowait(output)

    async def events(self):
        try:
            while not all(self.done):
                # everything that came since the last look, so a slow reader gets fewer, larger pieces
                outputs = [await self.queue.get()]
                while not self.queue.empty():
                    outputs.append(self.queue.get_nowait())
                changed = set()
                for output in outputs:
                    choice = self.choice_of[output.id]
                    if self.done[choice]:
                        continue
                    self.counted[choice] += output.token is not None
                    if output.finish:
                        self.done[choice] = "stop" if output.finish == "cancelled" else output.finish
                    if output.error:
                        self.errors[choice] = output.error
                        print(f"request {self.id}: choice {choice} ended with an error ({output.error})",
                              file=sys.stderr, flush=True)  # fmt: skip
                    changed.add(choice)
                for choice in sorted(changed):
                    new = self.new_text(choice)
                    if new or self.done[choice]:
                        yield choice, new, self.done[choice]
        finally:
            # the client went away (or the request ended): free every slot still held
            for choice, sequence in enumerate(self.sequences):
                if self.done[choice] is None:
                    self.engine.cancel(sequence)

    def new_text(self, choice):
        """The text not yet sent that can be sent (all of it once the choice is done); cut at a stop string."""
        # the tokens this choice counted: none that came after it ended (at a stop string)
        text = self.tokenizer.decode(self.sequences[choice].tokens[: self.counted[choice]])
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            text = text[: min(found)]
            if self.done[choice] is None:
                # the engine need not make more of this one
                self.engine.cancel(self.sequences[choice])
            self.done[choice] = "stop"
        end, start = len(text), self.shown[choice]
        if self.done[choice] is None:
            if text.endswith("\ufffd"):
                end = start
            # hold back a tail that could still grow into a stop string
            for s in self.stop:
                k = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                end = min(end, len(text) - k)
        self.texts[choice] = text
        if end <= start:
            return ""
        self.shown[choice] = end
        return text[start:end]

    def new_scores(self, choice):
        """With logprobs: [(token id, score)] of the choice's counted tokens not handed out yet, now handed out."""
        sequence, start = self.sequences[choice], self.scored[choice]
        end = min(self.counted[choice], len(sequence.scores))
        self.scored[choice] = max(start, end)
        new = list(zip(sequence.tokens[start:end], sequence.scores[start:end], strict=True))
        last = self.done[choice] and end == len(sequence.tokens)
        if sequence.stop_scored and last and not self.stop_given[choice]:
            # the stop token's entry last, as vLLM gives it on both routes (evaluation tools drop the last entry as
            # the made token's)
            stop, score = sequence.stop_scored
            new, self.stop_given[choice] = new + [(StopToken(stop), score)], True
        if not self.prompt_given[choice] and len(sequence.prompt_scores) == len(sequence.prompt) - 1:
            # the prompt's first token has no score: nothing came before it
            prompt = [(sequence.prompt[0], None)] + list(zip(sequence.prompt[1:], sequence.prompt_scores, strict=True))
            new, self.prompt_given[choice] = prompt + new, True
        return new

    def usage(self):
        completion = sum(self.counted)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def envelope(self, choices, chunk):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model_name, "choices": choices}  # fmt: skip

    async def answer(self, disconnected):
        """The whole answer once every choice is done; None if the client left first (disconnected() says so)."""
        reasons = {}

        async def collect():
            async for choice, _, reason in self.events():
                if reason is not None:
                    reasons[choice] = reason

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and await disconnected():
                task.cancel()
                return None
        if self.errors:
            raise ApiError(500, self.failure(), kind="server_error")
        choices = []
        for i, text in enumerate(self.texts):
            said = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": self.echoes[i] + text}
            scored = self.sequences[i].logprobs is not None and self.logprobs(self.new_scores(i))
            choices.append({"index": i, **said, "finish_reason": reasons[i], "logprobs": scored or None})
        return self.envelope(choices, False) | {"usage": self.usage()}

    async def stream(self, include_usage):
        """Server-sent events: a chunk per piece of text (with logprobs if asked), the finish reasons, [DONE]."""
        # completions' text_offset: where each choice's next token starts in its text
        offsets = [0] * len(self.sequences)
        # with logprobs the echo waits for the prompt's scores, and goes out with the first piece
        held = [e if s.score_prompt else "" for e, s in zip(self.echoes, self.sequences)]
        for i, echo in enumerate(self.echoes):
            if self.chat or (echo and not held[i]):
                said = {"delta": {"role": "assistant", "content": ""}} if self.chat else {"text": echo}
                first = said | ({} if self.chat else {"logprobs": None})
                yield sse(self.envelope([{"index": i, **first, "finish_reason": None}], True))
        async for i, text, reason in self.events():
            text, held[i] = held[i] + text, ""
            piece = {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
            scored = None
            if self.sequences[i].logprobs is not None:
                scored = self.logprobs(self.new_scores(i), offsets[i])
                offsets[i] += 0 if self.chat else sum(len(token) for token in scored["tokens"])
            yield sse(self.envelope([{"index": i, **piece, "finish_reason": reason, "logprobs": scored}], True))
        if include_usage:
            yield sse(self.envelope([], True) | {"usage": self.usage()})
        if self.errors:
            # what OpenAI's and vLLM's streams send when generation fails midway
            yield sse({"error": {"message": self.failure(), "type": "server_error", "param": None, "code": None}})
        yield sse("[DONE]")

    def failure(self):
        choice, cause = next(iter(self.errors.items()))
        return f"the server failed while generating choice {choice}: {cause} (the server's log has request {self.id})"

    def logprobs(self, scored, offset=0):
        """
        Tokens scored [(id, (log-probability, [(id, log-probability) of the likeliest]))] in OpenAI's shape: chat,
        {"content": [{token, logprob, bytes, top_logprobs}]}; completions, {tokens, token_logprobs, top_logprobs (the
        token's own and its alternatives'), text_offset (from offset, in the text)}.
        """

        def text(token):
            # the stop token's entry adds nothing to the text (it is there for its log-probability)
            return "" if isinstance(token, StopToken) else self.tokenizer.decode([token])

        # among the stop token's alternatives, the stop token itself reads as its entry does
        scored = [(t, s and (s[0], [(t if i == t else i, p) for i, p in s[1]])) for t, s in scored]

        if self.chat:

            def entry(token, logprob):
                piece = text(token)
                return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, p) for i, p in top]}
                                for t, (lp, top) in scored]}  # fmt: skip
        tokens = [text(t) for t, _ in scored]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        # a prompt's first token has no score (echo): None, where OpenAI has null
        return {"tokens": tokens, "token_logprobs": [s and s[0] for _, s in scored],
                "top_logprobs": [s and {text(t): s[0]} | {text(i): p for i, p in s[1]} for t, s in scored],
                "text_offset": offsets}  # fmt: skip


def sse(data):
    """One server-sent event: what OpenAI's streaming clients read."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
