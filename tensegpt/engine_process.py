"""
The batching engine in a process of its own, and its stand-in in the server's process.

serve.py's event loop turns every token into HTTP, and the engine's steps are Python too (a
small model's forward pass is mostly the interpreter's work). In one process the two take
turns on one interpreter lock, and the server is one busy core however many the machine has
(docs/serving.md measures it). So the engine runs in a child process, as vLLM's "engine
core" does, and the server holds a stand-in with the engine's own five methods:

    server process (its event loop)                          engine process
    EngineProcess.submit(*sequences)  -- ("submit", [request]) -->  Engine.submit
    EngineProcess.cancel(sequence)    -- ("cancel", id)        -->  Engine.cancel
    EngineProcess.step() -> Outputs   <-- (steps, Outputs)     --  Engine.step(), one message a step

The child loads the checkpoint itself (tensors do not cross the pipe, only token ids), picks
its dtype and threads, and steps while there is work, reading the server's messages between
steps. It ends when the server says stop or its pipe closes (the server is gone).
"""

import copy
import multiprocessing
import signal
import sys

import torch

from tensegpt.checkpoint import load_model
from tensegpt.common import UserError
from tensegpt.compiling import compile_for_serving
from tensegpt.engine import Engine, Output, step_seconds, warm_up
from tensegpt.hardware import pick_dtype
from tensegpt.scheduler import QueueFull
from tensegpt.sequence import Sequence


def model_threads(requested=0):
    """
    torch's threads for the model: requested, or with 0 one fewer than torch's default (the
    cores), at least 1. The event loop that turns every token into HTTP needs a core of its
    own: left all of them, torch's threads wait on each other at every operation while the
    loop waits for a core (docs/serving.md measures both).
    """
    return requested or max(1, torch.get_num_threads() - 1)


def serving_dtype(model, name, rows, device):
    """
    The dtype to serve in: name, or for 'auto' bfloat16 on GPUs that have it and, on a CPU,
    bfloat16 only where it makes both a step of one decoding sequence and a step of `rows`
    faster for this model, timed here. bfloat16 halves the bytes a step reads and pays off on
    CPUs with bfloat16 matmuls, for matrices large enough; a small model's steps are mostly
    overhead, and on most CPUs bfloat16 arithmetic is slower.
    """
    if name != "auto" or device != "cpu":
        return pick_dtype(name, device)
    # the model as loaded (float32) and one bfloat16 copy: half its size again, freed on return
    copies = {torch.float32: model, torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}
    sizes, times = sorted({1, rows}), {}
    # the best of two rounds, taken in turn, so that a moment when the machine is busy does not decide
    for _ in range(2):
        for dtype, copied in copies.items():
            for n in sizes:
                times[dtype, n] = min(times.get((dtype, n), float("inf")), step_seconds(copied, n, steps=5))
    faster = all(times[torch.bfloat16, n] < times[torch.float32, n] for n in sizes)
    return "bfloat16" if faster else "float32"


# ----------------------------------------------------------------------------- the engine's process


def run_engine(pipe, ckpt, device, dtype, threads, max_batch, prefill_chunk, seed, compile):
    """The child: load the model, say which dtype it chose, then step while there is work."""
    # Ctrl-C reaches every process of the terminal's group: the server decides when this one ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        model = load_model(ckpt, device)[0]
        # served in one dtype, the KV cache too: bfloat16 halves the bytes a step reads
        dtype = serving_dtype(model, dtype, max_batch, device)
        model.to(getattr(torch, dtype))
        # the queue's limit is kept by the server's stand-in, which sees every request first and counts it until it ends
        engine = Engine(model, max_batch, max_queue=float("inf"), prefill_chunk=prefill_chunk)
        if compile:
            # compiled now, on made-up requests, not on the first real ones
            compile_for_serving(model)
            warm_up(engine)
    except Exception as e:
        pipe.send(("failed", str(e) if isinstance(e, UserError) else f"{e.__class__.__name__}: {e}"))
        return
    pipe.send(("ready", dtype, torch.get_num_threads()))

    # id -> Sequence in flight here
    sequences = {}
    while True:
        # between steps, every message that came; with nothing to do, wait for the next
        while pipe.poll() or not engine.pending():
            try:
                kind, payload = pipe.recv()
            except EOFError:
                return
            if kind == "stop":
                return
            if kind == "cancel" and payload in sequences:
                engine.cancel(sequences[payload])
            elif kind == "submit":
                new = [Sequence(**request) for request in payload]
                sequences |= {s.id: s for s in new}
                engine.submit(*new)
        outputs = engine.step()
        for output in outputs:
            if output.finish:
                del sequences[output.id]
        # what the step made goes to the server at once, as plain tuples (a tenth of a dataclass's pickling)
        if outputs:
            pipe.send((engine.steps, [tuple(vars(output).values()) for output in outputs]))


# ----------------------------------------------------------------------------- the server's stand-in


class EngineGone(Exception):
    pass


class EngineProcess:
    """
    An Engine in a child process, seen from the server: submit, cancel, step, pending and busy_slots as Engine has
    them. step() never waits: it returns the Outputs the child has sent since the last call, applied to the server's
    own Sequences as Engine.step applies them (their tokens and scores). The server's event loop calls it when
    fileno() is readable: one thread, so nothing here needs a lock, and a step's tokens cost the loop one wake-up.
    """

    def __init__(self, ckpt, device, dtype, threads, max_batch, max_queue, prefill_chunk, seed, compile=False):
        self.max_batch, self.max_queue = max_batch, max_queue
        # id -> Sequence submitted and not yet finished
        self.live = {}
        self.steps, self.stopping, self.gone = 0, False, False
        # spawn, not fork: a fresh interpreter, not a copy of this one's threads and locks
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        args = (child_end, ckpt, device, dtype, threads, max_batch, prefill_chunk, seed, compile)
        self.process = context.Process(target=run_engine, args=args, name="engine", daemon=True)
        self.process.start()
        child_end.close()
        try:
            kind, *answer = self.pipe.recv()
        except EOFError:
            raise UserError(f"the engine process ended while starting (exit code {self.process.exitcode})") from None
        if kind == "failed":
            raise UserError(f"the engine process could not start: {answer[0]}")
        self.dtype, self.threads = answer

    def fileno(self):
        return self.pipe.fileno()

    def submit(self, *sequences):
        """Sends sequences to the engine (all or none); QueueFull when more than max_queue would wait."""
        if self.gone:
            raise EngineGone(f"the engine process ended (exit code {self.process.exitcode})")
        # the engine admits them as slots free up: those beyond the slots wait
        if len(self.live) + len(sequences) - self.max_batch > self.max_queue:
            waiting = max(0, len(self.live) - self.max_batch)
            raise QueueFull(f"{waiting} requests are waiting (--max_queue={self.max_queue})")
        self.live |= {s.id: s for s in sequences}
        self.send(("submit", [s.request() for s in sequences]))

    def cancel(self, sequence):
        sequence.cancelled = True
        if sequence.id in self.live:
            self.send(("cancel", sequence.id))

    def pending(self):
        return bool(self.live)

    def busy_slots(self):
        return min(len(self.live), self.max_batch)

    def send(self, message):
        try:
            self.pipe.send(message)
        except OSError:
            # the engine is gone: step() ends every sequence with an error
            pass

    def step(self):
        outputs = []
        try:
            while self.pipe.poll():
                self.steps, sent = self.pipe.recv()
                outputs += [output for output in (Output(*fields) for fields in sent) if self.apply(output)]
        except (EOFError, OSError):
            # its pipe closes as it dies
            outputs += [output for output in self.ended() if self.apply(output)]
        return outputs

    def apply(self, output):
        """Output to its sequence as Engine.step applies it; False for a sequence that has already ended."""
        sequence = self.live.get(output.id)
        if sequence is None:
            return False
        if output.prompt_scores is not None:
            sequence.prompt_scores = output.prompt_scores
        if output.token is not None:
            sequence.tokens.append(output.token)
            if output.score is not None:
                sequence.scores.append(output.score)
        elif output.stop_token is not None and output.score is not None:
            sequence.stop_scored = (output.stop_token, output.score)
        if output.finish:
            del self.live[output.id]
        return True

    def ended(self):
        """The engine's process is gone: what was in flight ends with an error, and every new request is refused."""
        if not self.stopping:
            self.process.join(timeout=5)
            print(f"engine: the engine process ended (exit code {self.process.exitcode}); requests end with an error",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.gone = True
        cause = f"the engine process ended (exit code {self.process.exitcode})"
        return [Output(id, finish="error", error=cause) for id in self.live]

    def stop(self):
        """Ends the engine process once the server has let its streams finish."""
        self.stopping = True
        self.send(("stop", None))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
