"""
Serves a trained model over HTTP with OpenAI's API, to many clients at once, and a web chat page.

    python serve.py --ckpt=out-chat/trained.pth          # then open http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/completions -d '{"prompt": "The baby is", "max_tokens": 20}' \\
        -H "Content-Type: application/json"                  # text, from a model served with --ckpt=out/trained.pth

Routes: POST /v1/chat/completions (chat models), POST /v1/completions (any model), GET /v1/models,
POST /tokenize and /detokenize, GET /health, GET / (the page). The official openai clients work
with base_url=http://127.0.0.1:8000/v1.
Requests running at the same time share each decoding step (continuous batching,
tensegpt/engine.py); docs/serving.md has the fields, the errors and the figures.
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse

from tensegpt.checkpoint import load_model
from tensegpt.common import UserError, main_guard, parse_config, pick_device
from tensegpt.engine_process import EngineGone, EngineProcess, model_threads
from tensegpt.hardware import DTYPES
from tensegpt.http_checks import (
    LOOPBACK,
    BodyLimit,
    LocalOnly,
    ReadsJson,
    check_key,
    check_port,
    host_name,
    install_errors,
    origins_pattern,
)
from tensegpt.openai_api import (
    END_OF_TEXT,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Generation,
    TokenizeRequest,
    check_token_ids,
    encode_text,
    sequences_of,
    stop_strings,
)

DEFAULTS = {
    "ckpt": "out-chat/trained.pth",  # the checkpoint to serve (a chat model, or any model for /v1/completions)
    "host": "127.0.0.1",  # the address to listen on; 0.0.0.0 opens it to the network
    "port": 8000,  # the port to listen on
    "model_name": "",  # the name clients ask for; empty: the checkpoint's folder (out-chat)
    # required on /v1 as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'; empty: $TENSEGPT_API_KEY, or none
    "api_key": "",
    "max_batch": 16,  # sequences decoded together (the KV cache's rows)
    "max_queue": 64,  # requests waiting for a row; beyond that the server answers 503
    "prefill_chunk": 256,  # prompt positions run per step: a long prompt waits, the others keep decoding
    "max_body_bytes": 1_000_000,  # a larger request body is refused (413)
    # web pages of these origins (comma-separated) may call the API; 'local': this machine's, any port; '*': any page
    "cors_origins": "local",
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'mps'
    "threads": 0,  # torch's threads for the model; 0: one core fewer than torch's default, the other for HTTP
    "dtype": "auto",  # the weights' and cache's: 'float32', 'bfloat16', 'float16' (CUDA); 'auto': the faster, timed
    "seed": 1337,  # the draws of requests that give no seed of their own
    "shutdown_timeout": 10.0,  # seconds SIGTERM waits for requests in flight before it closes them
    "compile": False,  # torch.compile the model: about a minute more at start, then faster steps (docs/serving.md)
}
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensegpt", "chat_page.html")


# ----------------------------------------------------------------------------- the routes


def make_app(block_size, vocab_size, tokenizer, engine, name, api_key="", max_body_bytes=1_000_000,
             cors_origins="local", loopback=True):  # fmt: skip
    # each sequence's id -> the Generation it belongs to, until it finishes
    listening = {}

    def deliver(loop):
        """The engine's Outputs since the last look, each to its request's generation."""
        for output in engine.step():
            generation = listening.pop(output.id) if output.finish else listening.get(output.id)
            if generation is not None:
                generation.put(output)
        if engine.gone:
            loop.remove_reader(engine.fileno())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # the engine's outputs are read on this event loop, as they come
        loop = asyncio.get_running_loop()
        loop.add_reader(engine.fileno(), deliver, loop)
        yield

    app = FastAPI(title="tense-gpt", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_errors(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ReadsJson)
    # web apps of the origins allowed (a chat UI on another port of this machine, by default) may call the API
    origins = origins_pattern(cors_origins)
    app.add_middleware(CORSMiddleware, allow_origin_regex=origins, allow_methods=["*"], allow_headers=["*"])
    # added last, so it runs first: pages of other origins, and other hosts' names on loopback, are refused
    app.add_middleware(LocalOnly, origins=origins, loopback=loopback)

    # async: a plain def would run in a worker thread, a hop per request
    async def authorized(request: Request):
        check_key(request, api_key)

    keyed = [Depends(authorized)]
    is_chat = hasattr(tokenizer, "end")
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "tense-gpt"}
    card |= {"max_model_len": block_size, "chat": is_chat}

    def check_model(requested):
        if requested not in (None, name):
            message = f"the model {requested!r} does not exist here; this server serves {name!r}"
            raise ApiError(404, message, "model", "model_not_found")

    @app.get("/health")
    def health():
        return {"status": "ok", "busy_slots": engine.busy_slots(), "slots": engine.max_batch, "steps": engine.steps}

    @app.get("/v1/models", dependencies=keyed)
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id}", dependencies=keyed)
    def one_model(model_id: str):
        check_model(model_id)
        return card

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if not is_chat:
            raise ApiError(400, f"{name} has no chat template (it was not fine-tuned to chat): use /v1/completions")
        prompt = chat_prompt(body.messages)
        return await respond(body, request, [prompt], {tokenizer.end, tokenizer.eot})

    def chat_prompt(messages):
        """The chat template's tokens for messages, up to the assistant's turn."""
        if not messages:
            raise ApiError(400, "messages must hold at least one message", "messages")
        # the template's roles: OpenAI's newer 'developer' is the system message
        return tokenizer.prompt(
            [{"role": m.role.replace("developer", "system"), "content": m.text()} for m in messages]
        )

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        sent = prompt_list(body.prompt)
        # an empty text starts a new one, like sample.py's empty --start
        prompts = [encode_text(tokenizer, p) or [tokenizer.eot] if isinstance(p, str) else p for p in sent]
        # echo: each choice's text starts with its prompt as sent (a tokenizer may not give a text back unchanged)
        echoes = [(p if isinstance(p, str) else tokenizer.decode(p)) if body.echo else "" for p in sent]
        return await respond(body, request, prompts, {tokenizer.eot}, echoes)

    def prompt_list(prompt):
        """The prompts of /v1/completions as a list of texts and token-id lists: a text, several, ids, or several."""
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = prompt if several else [prompt]
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ApiError(400, "prompt holds no prompt: send a text, or a list of token ids", "prompt")
        check_token_ids([i for p in prompts if isinstance(p, list) for i in p], vocab_size, "prompt")
        return prompts

    async def respond(body, request, prompts, stop_tokens, echoes=None):
        """The request's sequences through the engine, answered whole or as a stream."""
        sequences = sequences_of(body, prompts, frozenset(stop_tokens), block_size, vocab_size, engine.max_queue)
        stop = stop_strings(body)
        echoes = [e for e in echoes or [""] * len(prompts) for _ in range(body.n)]
        chat = isinstance(body, ChatRequest)
        try:
            generation = Generation(engine, tokenizer, sequences, body.n, stop, name, chat, echoes)
        except EngineGone as e:
            raise ApiError(503, f"{e}: restart the server (its log says why)", kind="server_error") from None
        listening.update(dict.fromkeys(generation.choice_of, generation))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(generation.stream(include_usage), media_type="text/event-stream")
        return await generation.answer(request.is_disconnected)

    # vLLM's /tokenize and /detokenize: what a client counts against the context before it asks
    @app.post("/tokenize", dependencies=keyed)
    def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send a prompt (a text) or messages (a chat), one of the two", "prompt")
        if body.messages is not None and not is_chat:
            raise ApiError(400, f"{name} has no chat template (it was not fine-tuned to chat): send a prompt")
        ids = chat_prompt(body.messages) if body.messages is not None else encode_text(tokenizer, body.prompt)
        return {"count": len(ids), "max_model_len": block_size, "tokens": ids}

    # vLLM's: what a client needs to count tokens through /tokenize (lm-evaluation-harness finds it by itself)
    @app.get("/tokenizer_info", dependencies=keyed)
    def tokenizer_info():
        return {"eos_token": END_OF_TEXT, "bos_token": None, "pad_token": None, "model_max_length": block_size,
                "tokenizer_class": type(tokenizer).__name__, "chat_template": None}  # fmt: skip

    @app.post("/detokenize", dependencies=keyed)
    def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        check_token_ids(body.tokens, vocab_size, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            settings = json.dumps({"chat": is_chat, "model": name}).replace("</", "<\\/")
            return f.read().replace("__SETTINGS__", settings)

    return app


# ----------------------------------------------------------------------------- the server


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], doc=__doc__)
    if not 1 <= config["port"] <= 65535:
        raise UserError(f"--port must be between 1 and 65535 (got {config['port']})")
    if not config["shutdown_timeout"] >= 0:
        raise UserError(f"--shutdown_timeout must be 0 seconds or more (got {config['shutdown_timeout']})")
    if config["threads"] < 0:
        raise UserError(f"--threads must be 0 (auto) or more (got {config['threads']})")
    for key in ("max_batch", "max_queue", "prefill_chunk", "max_body_bytes"):
        if config[key] < 1:
            raise UserError(f"--{key} must be at least 1 (got {config[key]})")
    if config["dtype"] not in DTYPES:
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16 (got {config['dtype']!r})")
    if not os.path.isfile(config["ckpt"]):
        raise UserError(f"no checkpoint at {config['ckpt']} (from --ckpt): train one first (docs/serving.md)")
    check_port(config["host"], config["port"])
    device = pick_device(config["device"])
    # this process needs the tokenizer and the context; the engine's process loads the model to run it
    model, tokenizer, _ = load_model(config["ckpt"])
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    del model
    name = config["model_name"] or os.path.basename(os.path.dirname(os.path.abspath(config["ckpt"])))
    api_key = config["api_key"] or os.environ.get("TENSEGPT_API_KEY", "")

    # the engine: a process of its own that steps the batch while requests come and go
    engine = EngineProcess(config["ckpt"], device, dtype=config["dtype"], threads=model_threads(config["threads"]),
                           max_batch=config["max_batch"], max_queue=config["max_queue"],
                           prefill_chunk=config["prefill_chunk"], seed=config["seed"],
                           compile=config["compile"])  # fmt: skip

    loopback = host_name(config["host"]) in LOOPBACK
    app = make_app(block_size, vocab_size, tokenizer, engine, name, api_key, config["max_body_bytes"],
                   config["cors_origins"], loopback)  # fmt: skip
    kind = "chat" if hasattr(tokenizer, "end") else "completions"
    print(f"serving {name} ({kind}; {engine.dtype}, {engine.threads} torch threads on {device}) at "
          f"http://{config['host']}:{config['port']} (the page at /, the API at /v1)", flush=True)  # fmt: skip
    # SIGTERM: uvicorn stops accepting, lets the requests in flight end (for --shutdown_timeout at most), and returns
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=config["host"], port=config["port"], log_level="info",
                    timeout_graceful_shutdown=config["shutdown_timeout"])  # fmt: skip
    finally:
        # also when uvicorn exits on an error: the engine's process ignores SIGTERM, so it must be told
        engine.stop()


if __name__ == "__main__":
    main_guard(main)
