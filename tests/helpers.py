"""Helpers the test files share: running the project's scripts as a user would, and sample text."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, cwd, check=True, timeout=120, **popen_args):
    """Runs a project script through its real command line; returns the CompletedProcess."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_args,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def fails(script, *args, cwd):
    """Runs a script that must refuse: exit code 1, no traceback, one 'error: ...' line; returns that line."""
    result = run_script(script, *args, cwd=cwd, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


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
    """In every layer, attention() written out equals the fused kernel forward uses, also with a KV cache."""
    import torch
    import torch.nn.functional as F

    from model import attention

    with torch.no_grad():
        x, caches = model.embed(idx), model.new_caches(1)
        for block, cache in zip(model.blocks, caches):
            h = block.ln_1(x)
            q, k, v = block.attn.heads(h)
            fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert torch.allclose(attention(q, k, v)[0], fused, atol=1e-5)
            # one new query against every cached key (the generation step)
            block.attn.heads(h[:, :-1], cache, pos=0)
            q, k, v = block.attn.heads(h[:, -1:], cache, pos=idx.size(1) - 1)
            step = attention(q, k, v)[0]
            assert torch.allclose(step, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
            assert torch.allclose(step, fused[:, :, -1:], atol=1e-5)
            x = block(x)
