"""
The HTTP harness beneath serve.py: OpenAI's request fields and error bodies, the checks
every request passes (size, key), and a request's tokens turned into text as they come.

Requests are parsed by FastAPI and pydantic; anything wrong with one, from malformed JSON
to a value out of range, is answered in OpenAI's shape with status 400:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": ...}}
"""

import asyncio
import hmac
import json
import socket
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.exceptions import HTTPException

from tensegpt.common import UserError
from tensegpt.engine import QueueFull, Sequence

# ----------------------------------------------------------------------------- requests


class ApiError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


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


class Sampling(BaseModel):
    """The fields both endpoints share. Fields that OpenAI's clients send and this server has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # an extension (vLLM and llama.cpp have it too); 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # an extension (vLLM's): CTRL's penalty on the prompt's and the answer's tokens
    logit_bias: dict[str, float] | None = None  # {"token id": -100 to 100, added to its logit}
    # vLLM's extensions, which its benchmarks send: no stop token before min_tokens; with ignore_eos, none at all
    min_tokens: int = 0
    ignore_eos: bool = False
    # chat: true, with top_logprobs alternatives a token; completions: the number of alternatives (0 to 20)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, fields):
        # some clients send every field, null where they leave it at its default: OpenAI reads null so
        return {k: v for k, v in fields.items() if v is not None} if isinstance(fields, dict) else fields


class ChatRequest(Sampling):
    messages: list[Message]


class CompletionRequest(Sampling):
    # a text, several, a text's token ids, or several of those (as OpenAI's API takes them)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt's text before each choice's


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None  # a text, or
    messages: list[Message] | None = None  # a chat, through the template up to the assistant's turn


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def check_port(host, port):
    """Refuses, before the model loads, an address another server is listening on (as uvicorn would bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            message = f"cannot listen on {host}:{port} ({e.strerror}): stop what is there, or pass another --port"
            raise UserError(message) from None


MAX_LOGPROBS = 20  # alternatives a token at most, as vLLM allows by default


def requested_logprobs(body, is_chat):
    """
    How many alternatives a token the request wants with its log-probabilities, None for none. Chat (OpenAI's chat
    API): logprobs true, top_logprobs 0 to 20. Completions (the legacy API): logprobs, an integer 0 to 20.
    """
    if is_chat:
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}; got {body.top_logprobs}",
                           "top_logprobs")  # fmt: skip
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.logprobs is None or body.logprobs is False:
        return None
    if not 0 <= int(body.logprobs) <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}; got {body.logprobs}", "logprobs")
    return int(body.logprobs)


def logprobs_field(tokenizer, scored, is_chat, offset=0):
    """
    The logprobs of a choice's tokens scored [(token id, (log-probability, [(id, log-probability) of the likeliest]))]
    in OpenAI's shape: chat, {"content": [{token, logprob, bytes, top_logprobs}]}; completions, {tokens,
    token_logprobs, top_logprobs (the token's own and its alternatives'), text_offset (from offset, in the text)}.
    """

    def text(token):
        return tokenizer.decode([token])

    if is_chat:

        def entry(token, logprob):
            piece = text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, p) for i, p in top]} for t, (lp, top) in scored]}
    tokens = [text(t) for t, _ in scored]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # a prompt's first token has no score (echo): None, where OpenAI has null
    return {"tokens": tokens, "token_logprobs": [s and s[0] for _, s in scored],
            "top_logprobs": [s and {text(t): s[0]} | {text(i): p for i, p in s[1]} for t, s in scored],
            "text_offset": offsets}  # fmt: skip


def check_token_ids(ids, vocab_size, param):
    """Refuses, naming param, token ids outside the vocabulary: the first such id, not the largest."""
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ApiError(400, f"{param}: token ids go from 0 to {vocab_size - 1}; got {outside[0]}", param)


def check_sampling(body, max_n, vocab_size):
    """The fields' ranges, each refused with the field named; returns (the stop strings as a list, logit_bias by id)."""
    checks = [
        ("max_tokens", body.max_tokens is None or body.max_tokens >= 1, "must be at least 1"),
        ("max_completion_tokens", (body.max_completion_tokens or 1) >= 1, "must be at least 1"),
        ("temperature", 0.0 <= body.temperature <= 2.0, "must be between 0 and 2 (0: the most likely token)"),
        ("top_p", 0.0 < body.top_p <= 1.0, "must be in (0, 1]"),
        ("top_k", body.top_k is None or body.top_k >= -1, "must be a whole number >= 1 (0 or -1: off)"),
        ("n", 1 <= body.n <= max_n, f"must be between 1 and {max_n}"),
        ("presence_penalty", -2.0 <= body.presence_penalty <= 2.0, "must be between -2 and 2"),
        ("frequency_penalty", -2.0 <= body.frequency_penalty <= 2.0, "must be between -2 and 2"),
        ("repetition_penalty", body.repetition_penalty > 0, "must be above 0 (1: off)"),
        (
            "min_tokens",
            0 <= body.min_tokens <= (body.max_completion_tokens or body.max_tokens or body.min_tokens),
            "must be 0 or more, and no more than max_tokens",
        ),
    ]
    for param, ok, problem in checks:
        if not ok:
            raise ApiError(400, f"{param} {problem}; got {getattr(body, param)!r}", param)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(s == "" for s in stop):
        raise ApiError(400, f"stop must be at most 4 non-empty strings; got {body.stop!r}", "stop")
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        # ASCII digits only: str.isdigit also takes superscripts and circled digits, which int() refuses
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size and -100 <= value <= 100):
            message = f"logit_bias maps token ids (0 to {vocab_size - 1}) to -100 ... 100; got {key!r}: {value}"
            raise ApiError(400, message, "logit_bias")
        bias[int(key)] = value
    return stop, bias


# ----------------------------------------------------------------------------- errors and checks


def field_path(error):
    """
    Where a pydantic error is, as field names and list indices: the body's own place left out, and the member of a
    union that failed ('str', 'list[str]', 'TextPart'), which pydantic puts in the path.
    """

    def is_type(p):
        return p in ("str", "int", "float", "bool", "dict", "list") or "[" in p or p[:1].isupper() or "-" in p

    return [str(p) for p in error["loc"] if p != "body" and not (isinstance(p, str) and is_type(p))]


def install_errors(app: FastAPI):
    """Every refusal in OpenAI's error shape: the server's own, pydantic's, an unknown route, a crash."""

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        errors = e.errors()
        first = errors[0]
        if first["type"] != "json_invalid":
            # a field that may be of several types fails once per type: the failure deepest in the field names it
            field = field_path(first)[:1]
            same = [error for error in errors if field_path(error)[:1] == field]
            deepest = max(len(field_path(error)) for error in same)
            place = next(field_path(error) for error in same if len(field_path(error)) == deepest)
            same = [error for error in same if field_path(error) == place]
            first = same[0] | {"msg": ", or ".join(dict.fromkeys(error["msg"] for error in same))}
        where = field_path(first)
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in where).lstrip(".") or None
        if first["type"] == "json_invalid":
            at = first["loc"][-1]
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])} at character {at}"
            return ApiError(400, message).response()
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param or 'the body'}: {first['msg']}; got {json.dumps(first.get('input'), default=repr)[:80]}"
        return ApiError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        if e.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", kind="not_found_error").response()
        if e.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def crash(request, e):
        return ApiError(500, f"internal error: {e.__class__.__name__}", kind="server_error").response()


class ReadsJson:
    """
    Reads every POST body as JSON, whatever Content-Type it declares: `curl -d` without `-H` declares a form, and
    FastAPI would then not parse the body at all (llama.cpp's server reads JSON the same way). A body that is not
    JSON is then refused as such, with where it breaks.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over max_bytes with 413, by its Content-Length or as it arrives (chunked)."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = ApiError(413, f"the body is over the limit of {self.max_bytes} bytes (--max_body_bytes)")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        # no length declared (a chunked body): read it here, up to the limit, and hand it on whole
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def check_key(request: Request, api_key):
    """With an API key set, a /v1 request must carry 'Authorization: Bearer KEY' (401 otherwise)."""
    if not api_key:
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(
            401, "a valid API key is required: send 'Authorization: Bearer KEY'", kind="authentication_error"
        )


# ----------------------------------------------------------------------------- one request's generation


class Generation:
    """
    The sequences of one request, n for each of its prompts (choice i * n + j is prompt i's j-th,
    as OpenAI numbers them), from the engine (its messages are read on the event loop) to this
    request's coroutine: events() yields (choice, new text, finish reason or None) as the tokens
    come. Text is held back while it could still be the start of a stop string or ends inside a
    character. With logprobs, new_scores(choice) hands out the scores of the tokens counted since
    the last call (the prompt's first, with echo).
    """

    def __init__(self, engine, tokenizer, prompts, n, stop, **settings):
        self.engine, self.tokenizer, self.stop = engine, tokenizer, stop
        # echo with logprobs: the prompt's tokens and scores come first in each choice's logprobs
        self.with_prompt = settings.get("score_prompt", False)
        self.queue = asyncio.Queue()
        self.id, self.created = uuid.uuid4().hex[:24], int(time.time())
        self.prompt_tokens = sum(len(prompt) for prompt in prompts)
        seed = settings.pop("seed")
        self.sequences = [
            Sequence(
                prompt,
                **settings,
                seed=None if seed is None else (seed + i) % 2**63,
                on_token=lambda token, i=i: self.put(i, token, None),
                on_finish=lambda reason, i=i: self.put(i, None, reason),
            )
            for i, prompt in enumerate(prompt for prompt in prompts for _ in range(n))
        ]
        choices = len(self.sequences)
        self.texts, self.shown = [""] * choices, [0] * choices
        self.done, self.counted, self.scored = [None] * choices, [0] * choices, [0] * choices
        self.prompt_given = [not self.with_prompt] * choices
        try:
            engine.submit(*self.sequences)
        except QueueFull as e:
            message = f"the server is busy: {e}; try again shortly"
            raise ApiError(503, message, kind="server_error", code="overloaded") from None

    def put(self, choice, token, reason):
        self.queue.put_nowait((choice, token, reason))

    async def events(self):
        try:
            while not all(self.done):
                # everything that came since the last look, so a slow reader gets fewer, larger pieces
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                changed = set()
                for choice, token, reason in batch:
                    if self.done[choice]:
                        continue
                    if token is not None:
                        self.counted[choice] += 1
                    else:
                        self.done[choice] = "stop" if reason == "cancelled" else reason
                    changed.add(choice)
                for choice in sorted(changed):
                    # the tokens this choice counted: none that came after it ended (at a stop string)
                    self.texts[choice] = self.tokenizer.decode(self.sequences[choice].tokens[: self.counted[choice]])
                    if self.cut_at_stop(choice):
                        if self.done[choice] is None:
                            # the engine need not make more of this one
                            self.engine.cancel(self.sequences[choice])
                        self.done[choice] = "stop"
                    new = self.new_text(choice, final=self.done[choice] is not None)
                    if new or self.done[choice]:
                        yield choice, new, self.done[choice]
        finally:
            # the client went away (or the request ended): free every slot still held
            for choice, sequence in enumerate(self.sequences):
                if self.done[choice] is None:
                    self.engine.cancel(sequence)

    def cut_at_stop(self, choice):
        """True once a stop string appears in the text, which is then cut before it."""
        text = self.texts[choice]
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            self.texts[choice] = text[: min(found)]
        return bool(found)

    def new_text(self, choice, final):
        """The text not yet sent that can be sent: all of it when final."""
        text, start = self.texts[choice], self.shown[choice]
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                return ""
            # hold back a tail that could still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
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
        if not self.prompt_given[choice] and len(sequence.prompt_scores) == len(sequence.prompt) - 1:
            # the prompt's first token has no score: nothing came before it
            prompt = [(sequence.prompt[0], None)] + list(zip(sequence.prompt[1:], sequence.prompt_scores, strict=True))
            new, self.prompt_given[choice] = prompt + new, True
        return new

    def usage(self):
        # as OpenAI counts them: each prompt once, whatever n
        completion = sum(self.counted)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip


async def finish_unless_disconnected(generation, request):
    """Each choice's finish reason once a non-streamed generation ends; None if the client left first."""
    reasons = {}

    async def collect():
        async for choice, _, reason in generation.events():
            if reason is not None:
                reasons[choice] = reason

    task = asyncio.ensure_future(collect())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            break
    try:
        await task
    except asyncio.CancelledError:
        return None
    return reasons


def sse(data):
    """One server-sent event: what OpenAI's streaming clients read."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
