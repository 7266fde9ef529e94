"""Helpers the test files share: running the project's scripts as a user would, and sample text."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, cwd, check=True, timeout=120, **popen_args):
    """
    Runs a project script through its real command line; returns the CompletedProcess.
    A plain run (no env, no other Popen arguments) is started by the fork server below:
    the same script, arguments, folder, standard input and exit status, without paying
    torch's import again for each of the suite's hundreds of runs.
    """
    if set(popen_args) <= {"input"} and FORK_SERVER.usable():
        result = FORK_SERVER.run(script, args, cwd, popen_args.get("input"), timeout)
    else:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, script), *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            **popen_args,
        )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def fine_tune_chat(folder, base, *train_args):
    """
    make_tense.py's tense instructions (600 conversations) prepared on base's vocabulary into
    folder/data-chat and fine-tuned from base with config/tiny.py and train_args into
    folder/out-chat; returns the new checkpoint's path.
    """
    run_script("make_tense.py", "--task=chat", "--n=600", cwd=folder)
    run_script("prepare.py", "--input=tense_chat.jsonl", "--val_input=tense_chat_val.jsonl",
               f"--vocab_from={base}", "--out_dir=data-chat", cwd=folder)  # fmt: skip
    tiny = os.path.join(ROOT, "config", "tiny.py")
    run_script("train.py", tiny, "--chat=True", f"--init_from={base}", "--data_dir=data-chat",
               "--out_dir=out-chat", *train_args, cwd=folder)  # fmt: skip
    return folder / "out-chat" / "trained.pth"


class ForkServer:
    """
    A process that has imported torch, numpy and tiktoken and does nothing else: for each
    run it forks a child that runs the script as `python script args` would (its own
    folder, argv, standard streams and exit status; sys.path[0] the project's root). The
    server never runs a torch operation, so no thread pool exists when it forks.
    """

    def __init__(self):
        self.process = None

    def usable(self):
        return hasattr(os, "fork") and os.environ.get("TENSEGPT_TEST_NO_FORK_SERVER") != "1"

    def start(self):
        code = "import sys; sys.path.insert(0, sys.argv[1]); import fork_server; fork_server.serve()"
        tests = os.path.join(ROOT, "tests")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, tests], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, script, args, cwd, stdin_text, timeout):
        if self.process is None or self.process.poll() is not None:
            self.start()
        with tempfile.TemporaryDirectory() as folder:
            paths = {name: os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")}
            with open(paths["stdin"], "w", encoding="utf-8") as f:
                f.write(stdin_text or "")
            request = {"script": os.path.join(ROOT, script), "args": list(args), "cwd": str(cwd), **paths}
            request["env"] = dict(os.environ)
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = int(self.process.stdout.readline())
            status = self.wait(pid, timeout, script, args)
            out, err = (read_text(paths[name]) for name in ("stdout", "stderr"))
            return subprocess.CompletedProcess([script, *args], status, out, err)

    def wait(self, pid, timeout, script, args):
        """The child's exit status, which the server reports when it ends; killed past timeout."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            self.process.stdout.readline()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        return int(self.process.stdout.readline())


FORK_SERVER = ForkServer()


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def fails(script, *args, cwd):
    """Runs a script that must refuse: exit code 1, no traceback, one 'error: ...' line; returns that line."""
    result = run_script(script, *args, cwd=cwd, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_jsonl(path, conversations):
    """A chat data file: one {"messages": [...]} a line."""
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")


def talk(question, reply):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def tense_lines(n):
    with open(os.path.join(ROOT, "tense.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f][:n]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the cores


def torchrun_command(*args, script="train.py"):
    """The command line of script under torchrun with 2 processes on this machine (gloo on a CPU)."""
    torchrun_bin = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun_bin, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, script), *args]


def torchrun(*args, cwd, script="train.py", check=True):
    """script under torchrun with 2 processes; returns the CompletedProcess."""
    result = subprocess.run(
        torchrun_command(*args, script=script),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env=TORCHRUN_ENV,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"torchrun {script} {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def losses(out_dir):
    """The loss of every logged step of a run, from its metrics.jsonl."""
    return [
        loss
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if '"losses"' in line
        for loss in json.loads(line)["losses"]
    ]


def assert_explicit_attention_is_the_fused_one(model, idx):
    """
    Attention written out (attention='explicit') gives the fused kernel's logits: over a whole
    sequence, one token after a KV cache, several after it (the mask built from input_pos), and
    rows of different lengths decoded together (each row's own position, a server's SlotCache).
    """
    from dataclasses import replace

    import torch

    twins = []
    for attention in ("sdpa", "explicit"):
        twin = type(model)(replace(model.config, attention=attention)).eval()
        twin.load_state_dict(model.state_dict())
        twins.append(twin)

    def both(idx, caches=None, input_pos=0):
        every = torch.arange(idx.numel())
        outputs = [
            twin(idx, caches=c, input_pos=input_pos, logits_at=every)[0]
            for twin, c in zip(twins, caches or (None, None))
        ]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        return outputs[0].view(*idx.shape, -1)

    with torch.no_grad():
        T = idx.size(1)
        full = both(idx)
        for new in (1, 3):
            caches = [twin.new_caches(1) for twin in twins]
            for twin, c in zip(twins, caches):
                twin(idx[:, : T - new], caches=c)
            torch.testing.assert_close(both(idx[:, T - new :], caches, T - new), full[:, T - new :])
        # two rows at different points of the same sequence (a server's batch): row 0 after 4 tokens,
        # row 1 after T - 1, in slots 1 and 0 of a cache that the server's SlotCache reads
        from tensegpt.runner import SlotCache

        starts, slots = torch.tensor([4, T - 1]), torch.tensor([1, 0])
        caches = []
        for twin in twins:
            cache = twin.new_caches(2)
            for start, slot in zip(starts.tolist(), slots.tolist()):
                alone = twin.new_caches(1)
                twin(idx[:, :start], caches=alone)
                for layer, filled in zip(cache, alone):
                    layer.k[slot], layer.v[slot] = filled.k[0], filled.v[0]
            caches.append([SlotCache(layer, slots, T) for layer in cache])
        tokens = idx[0, starts][:, None]  # (2, 1)
        step = both(tokens, caches, starts[:, None])  # (2, 1, V)
        torch.testing.assert_close(step[:, 0], full[0, starts])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """python serve.py on a free loopback port, until stop()."""

    def __init__(self, ckpt, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(os.path.dirname(ckpt), f"serve-{self.port}.log"), "w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={self.port}", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        for _ in range(300):  # at most 30 s to start
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve.py did not answer in 30 s:\n{self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()
