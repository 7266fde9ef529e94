"""
What continuous batching buys, measured against serve.py over loopback (docs/serving.md):

    python -m tensegpt.serve_bench --ckpt=out-chat/trained.pth      # a chat model, through /v1/chat/completions
    python -m tensegpt.serve_bench --gpt2                            # GPT-2 124M, random weights, /v1/completions
    python -m tensegpt.serve_bench --ckpt=out-chat/trained.pth --load_requests=400   # the load test
    python -m tensegpt.serve_bench --gpt2 --engine_only=True       # the bound: the engine alone, no HTTP

For each number of concurrent clients (1, 4, 8, 16) the same list of streamed requests is
served, the clients each taking the next request as theirs ends; 1 client is the requests
served one at a time. Reported: aggregate completion tokens per second, time to first token
and time between tokens (p50, p95), and the cores kept busy by the server's two processes
(HTTP and the engine) and by the clients (coroutines on one event loop, so that they take
little from the server). The load test sends a fixed number of requests from concurrent
clients, mixed streamed and not, some abandoned mid-stream, and checks that each got a
complete answer or a clear error, the server's memory (both processes) and its log; every seventh
request is hostile (a body cut short, settings out of range or at their edges, another
origin or Host) and one client stalls halfway through its body throughout.
--engine_only steps the batching engine in this process, every row decoding, with no HTTP,
server or clients: the ceiling that batching can reach on this machine. It is a benchmark:
nothing here asserts a speed.
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402
from tensegpt.checkpoint import load_model, save  # noqa: E402
from tensegpt.common import main_guard, parse_config  # noqa: E402
from tensegpt.compiling import compile_for_serving  # noqa: E402
from tensegpt.engine import step_seconds  # noqa: E402
from tensegpt.engine_process import serving_dtype  # noqa: E402
from tensegpt.http_checks import check_port  # noqa: E402
from tensegpt.tokenizer import GPT2  # noqa: E402

DEFAULTS = {
    "ckpt": "",  # the checkpoint to serve
    "gpt2": False,  # serve GPT-2 124M with random weights instead (built here, nothing downloaded)
    "streams": "1,4,8,16",  # the numbers of concurrent clients
    "requests": 32,  # requests per number of clients
    "max_tokens": 32,  # per request (a chat model's answer usually ends before)
    "stream": True,  # False: whole answers, no per-token HTTP cost (TTFT is then the whole request)
    "load_requests": 0,  # > 0: the load test instead, with this many requests
    "port": 8765,
    "dtype": "auto",  # serve.py's --dtype (and the engine's alone)
    "threads": 0,  # serve.py's --threads (and the engine's alone); 0: serve.py's own choice
    "compile": False,  # serve.py's --compile (and the engine's alone)
    "engine_only": False,  # True: the engine alone, in this process, at each --streams number of rows
}
CHAT_REQUESTS = [
    "Put this sentence in the past simple: The baby sleeps on the sofa.",
    "Negate: My friends have read the book.",
    "Make this a question: She will be washing the car.",
    "Which tense is this: They had cooked dinner?",
]
TEXT_PROMPTS = ["The baby", "Yesterday, my friends", "By next year, our teacher", "She is not", "They have"]


def gpt2_checkpoint(folder):
    """GPT-2 124M's shape with random weights, saved as a checkpoint serve.py loads."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    path = os.path.join(folder, "gpt2-random", "trained.pth")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model = GPT(config)
    save({"model": model.state_dict(), "model_config": config.__dict__, "tokenizer_meta": GPT2().meta()}, path)
    return path


def start_server(ckpt, port, options, log):
    command = [sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}"]
    command += [f"--{key}={options[key]}" for key in ("dtype", "threads", "compile")]
    # a server left on the port would answer in place of this one before serve.py refuses the port itself
    check_port("127.0.0.1", port)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    # --compile compiles before it listens: GPT-2 takes minutes on two cores
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        try:
            card = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()["data"][0]
            return process, card
        except (httpx.HTTPError, KeyError):
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"serve.py did not start (its log: {log.name})")


def request_body(card, i, max_tokens, stream=True):
    body = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": stream}
    if card["chat"]:
        return {**body, "messages": [{"role": "user", "content": CHAT_REQUESTS[i % len(CHAT_REQUESTS)]}]}
    return {**body, "prompt": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}


async def streamed(session, url, body):
    """(time to first token, gaps between tokens, tokens) of one streamed request."""
    start, times, tokens = time.perf_counter(), [], 0
    async with session.post(url, json={**body, "stream_options": {"include_usage": True}}) as response:
        if response.status != 200:
            raise RuntimeError(f"the server refused a request: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and (
                chunk["choices"][0].get("delta", {}).get("content") or chunk["choices"][0].get("text")
            ):
                times.append(time.perf_counter())
    # an answer with no text (the model ended its turn at once): its first token is its end
    times = times or [time.perf_counter()]
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens


async def whole(session, url, body):
    """(time to the whole answer, no gaps, tokens) of one request answered whole."""
    start = time.perf_counter()
    async with session.post(url, json={**body, "stream": False}) as response:
        reply = await response.json()
    return time.perf_counter() - start, [], reply["usage"]["completion_tokens"]


def run_clients(clients, n_requests, request):
    """
    Requests 0..n_requests-1 from `clients` concurrent clients, each taking the next as its last
    ends: request(session, i) coroutines on one event loop, so the clients cost this process
    little (threads of a blocking client would fight over the GIL and take a core from the server).
    """
    queue = list(range(n_requests))

    async def client_loop(session):
        while queue:
            await request(session, queue.pop(0))

    async def all_clients():
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            await asyncio.gather(*[client_loop(session) for _ in range(clients)])

    asyncio.run(all_clients())


def cpu_seconds(pid):
    """User and system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid):
    """The processes serve.py started: the engine's (and multiprocessing's idle resource tracker)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def serve_requests(url, card, pid, clients, n_requests, max_tokens, stream=True):
    """n_requests requests from `clients` concurrent clients to the server of process pid: the figures of one row."""
    path = url + ("/v1/chat/completions" if card["chat"] else "/v1/completions")
    results, measure = [], streamed if stream else whole

    async def one(session, i):
        results.append(await measure(session, path, request_body(card, i, max_tokens)))

    engine = children(pid)
    server_cpu, engine_cpu, client_cpu = cpu_seconds(pid), sum(map(cpu_seconds, engine)), time.process_time()
    start = time.perf_counter()
    run_clients(clients, n_requests, one)
    seconds = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
    engine_cpu = sum(map(cpu_seconds, engine)) - engine_cpu
    ttft = [r[0] * 1000 for r in results]
    gaps = [g * 1000 for r in results for g in r[1]] or [float("nan")]
    tokens = sum(r[2] for r in results)
    pct = lambda xs, q: statistics.quantiles(xs, n=20)[18] if q == 95 and len(xs) > 1 else statistics.median(xs)
    # cores busy: CPU seconds per second of the row, the server's HTTP process, its engine's and the clients'
    return {"clients": clients, "requests": n_requests, "tokens": tokens, "seconds": seconds,
            "tokens_per_sec": tokens / seconds, "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "itl_p50_ms": pct(gaps, 50), "itl_p95_ms": pct(gaps, 95),
            "server_cpu": server_cpu / seconds, "engine_cpu": engine_cpu / seconds,
            "client_cpu": client_cpu / seconds}  # fmt: skip


def rss_mb(pid):
    """Resident memory of the server: its process and the engine's."""
    total = 0
    for p in [pid, *children(pid)]:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
    return total


def hostile(card, i, max_tokens):
    """
    Request i of the load test's hostile clients, as (body bytes, headers, the status it must get): each one a kind
    of request that once broke a server or its neighbours, or settings at the edge of their ranges, which must work.
    """
    body = request_body(card, i, max_tokens, stream=i % 2 == 0)
    edges = {"temperature": 5e-324, "top_p": 5e-324, "repetition_penalty": 0.01, "presence_penalty": -2,
             "frequency_penalty": 2, "logit_bias": {"0": 100, "1": -100}, "min_tokens": max_tokens}  # fmt: skip
    kinds = [
        (json.dumps(body | edges).encode(), {}, 200),
        (json.dumps(body)[:20].encode(), {}, 400),
        (json.dumps(body | {"repetition_penalty": 1e-300}).encode(), {}, 400),
        (json.dumps(body | {"logit_bias": {"\u00b2": 5}}).encode(), {}, 400),
        (json.dumps(body | {"temperature": float("nan")}).encode(), {}, 400),
        (json.dumps(body | {"n": 10**6}).encode(), {}, 400),
        (json.dumps(body).encode(), {"Origin": "http://evil.example"}, 403),
        (json.dumps(body).encode(), {"Host": "evil.example"}, 403),
    ]
    return kinds[(i // 7) % len(kinds)]


def stall(url):
    """A client that sends half its body, then nothing: the server must go on answering the others."""
    host, port = url.split("//")[1].split(":")
    stalled = socket.create_connection((host, int(port)), timeout=10)
    stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n{{".encode())
    return stalled


def load_test(url, card, pid, n_requests, max_tokens, clients=8):
    """
    n_requests from `clients` clients: every third not streamed (and its text the one it gets alone), every fifth
    abandoned after its first piece, every seventh hostile (hostile()), and a client stalled halfway through its body
    throughout. Every request must get its answer, its refusal, or be abandoned as planned: anything else counts.
    """
    path = url + ("/v1/chat/completions" if card["chat"] else "/v1/completions")
    outcomes = {"complete": 0, "abandoned": 0, "refused": 0, "error": 0, "lost": 0, "different": 0}
    memory = [rss_mb(pid)]
    whole = [i for i in range(n_requests) if i % 3 == 0 and i % 7 != 3]

    def text_of(reply):
        choice = reply["choices"][0]
        return choice["message"]["content"] if card["chat"] else choice["text"]

    # what each request answered whole gets served alone (seeded, so the same text is due under load)
    alone = {}

    async def served_alone(session, i):
        if i in whole:
            async with session.post(path, json=request_body(card, i, max_tokens, stream=False)) as response:
                alone[i] = text_of(await response.json())

    run_clients(1, n_requests, served_alone)

    async def one(session, i):
        if i % 7 == 3:
            data, headers, status = hostile(card, i, max_tokens)
            async with session.post(path, data=data, headers=headers) as response:
                if response.status != status:
                    return "error"
                text = (await response.read()).decode()
                if status != 200:
                    error = json.loads(text).get("error", {})
                    return "refused" if set(error) == {"message", "type", "param", "code"} else "error"
                if text.startswith("data: "):
                    return "complete" if text.rstrip().endswith("data: [DONE]") else "lost"
                return "complete" if json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length") else "error"
        body = request_body(card, i, max_tokens, stream=i % 3 != 0)
        async with session.post(path, json=body) as response:
            if response.status != 200 or not body["stream"]:
                reply = await response.json()
                ok = response.status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
                if ok and text_of(reply) != alone[i]:
                    return "different"
                return "complete" if ok else ("error" if "error" in reply else "lost")
            events = []
            async for line in response.content:
                if line.startswith(b"data: "):
                    events.append(line.strip())
                    if i % 5 == 0:
                        # hang up after the first piece: the server must free the slot
                        response.close()
                        return "abandoned"
            return "complete" if events and events[-1] == b"data: [DONE]" else "lost"

    async def counted(session, i):
        outcomes[await one(session, i)] += 1
        if sum(outcomes.values()) % 50 == 0:
            memory.append(rss_mb(pid))

    stalled = stall(url)
    try:
        run_clients(clients, n_requests, counted)
    finally:
        stalled.close()
    memory.append(rss_mb(pid))
    return {**outcomes, "rss_mb": [round(m) for m in memory]}


def engine_alone(model, rows, steps=20):
    """ms per decode step and tokens/s of the engine with `rows` sequences decoding, no HTTP."""
    ms = 1000 * step_seconds(model, rows, steps)
    return {"rows": rows, "ms_per_step": ms, "tokens_per_sec": rows / ms * 1000}


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = gpt2_checkpoint(folder) if config["gpt2"] else config["ckpt"]
        if config["engine_only"]:
            # no event loop to leave a core for: every core, unless --threads says otherwise
            torch.set_num_threads(config["threads"] or torch.get_num_threads())
            model = load_model(ckpt)[0]
            dtype = serving_dtype(model, config["dtype"], int(config["streams"].split(",")[-1]), "cpu")
            model.to(getattr(torch, dtype))
            if config["compile"]:
                # compiled as serve.py compiles it; each row count's untimed first steps compile what it needs
                compile_for_serving(model)
            rows = [engine_alone(model, int(c)) for c in config["streams"].split(",")]
            compiled = ", compiled" if config["compile"] else ""
            print(f"the engine alone, {dtype}{compiled}, {torch.get_num_threads()} torch threads")
            print("rows | ms per step | tokens/s | x one row")
            for r in rows:
                speedup = r["tokens_per_sec"] / rows[0]["tokens_per_sec"]
                print(f"{r['rows']:>4} | {r['ms_per_step']:11.2f} | {r['tokens_per_sec']:8.1f} | {speedup:9.2f}")
            return
        log_path = os.path.join(folder, "serve.log")
        with open(log_path, "w") as log:
            process, card = start_server(ckpt, config["port"], config, log)
        url = f"http://127.0.0.1:{config['port']}"
        try:
            with open(log_path) as f:
                # serve.py's line that names the model, its dtype and threads (compiling may print before it)
                print(next(line for line in f if line.startswith("serving ")).strip() + f"; {os.cpu_count()} cores")
            if config["load_requests"]:
                report = load_test(url, card, process.pid, config["load_requests"], config["max_tokens"])
                with open(log_path) as f:
                    report["tracebacks_in_log"] = f.read().count("Traceback")
                print(json.dumps(report))
                return
            # one warm-up request: the first pays for lazy initialisation
            serve_requests(url, card, process.pid, 1, 1, config["max_tokens"])
            rows = [serve_requests(url, card, process.pid, int(c), config["requests"], config["max_tokens"],
                                   config["stream"]) for c in config["streams"].split(",")]  # fmt: skip
            alone = rows[0]["tokens_per_sec"]
            print("clients | tokens/s | x one at a time | TTFT p50 / p95 ms | between tokens p50 / p95 ms | "
                  "cores busy: HTTP, engine, clients")  # fmt: skip
            for r in rows:
                ttft = f"{r['ttft_p50_ms']:7.1f} / {r['ttft_p95_ms']:7.1f}"
                itl = f"{r['itl_p50_ms']:6.1f} / {r['itl_p95_ms']:6.1f}"
                speedup = r["tokens_per_sec"] / alone
                cpu = f"{r['server_cpu']:.2f}, {r['engine_cpu']:.2f}, {r['client_cpu']:.2f}"
                print(f"{r['clients']:>7} | {r['tokens_per_sec']:8.1f} | {speedup:15.2f} | {ttft} | {itl} | {cpu}")
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main_guard(main)
