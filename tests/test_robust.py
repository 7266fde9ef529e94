"""Nothing is lost: atomic writes, Ctrl-C saves, exact resume, and no code runs from a checkpoint."""

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_script

from tensegpt import common

TINY = os.path.join(ROOT, "config", "tiny.py")


def test_atomic_write_crash_before_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "trained.pth"
    target.write_bytes(b"old checkpoint")

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(common.os, "replace", crash)
    with pytest.raises(
        common.UserError,
        match=f"^cannot write {target} \\(simulated crash between write and rename\\); the previous file is unchanged$",
    ):
        common.atomic_write(str(target), lambda f: f.write(b"new checkpoint"))
    assert target.read_bytes() == b"old checkpoint"
    assert os.listdir(tmp_path) == ["trained.pth"]  # no temporary file left behind


def test_atomic_write_crash_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "train.bin"
    target.write_bytes(b"old data")

    def half_then_crash(f):
        f.write(b"new da")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(target), half_then_crash)
    assert target.read_bytes() == b"old data" and os.listdir(tmp_path) == ["train.bin"]
    common.atomic_write(str(target), lambda f: f.write(b"new data"))
    assert target.read_bytes() == b"new data"


def losses_by_iter(out_dir):
    """iteration -> training loss, from the per-step losses of metrics.jsonl."""
    result = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "losses" in record:
            first = record["iter"] - len(record["losses"]) + 1
            result.update({first + i: loss for i, loss in enumerate(record["losses"])})
    return result


def test_resume_is_exact(tiny_run, tmp_path):
    common_args = [
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--log_interval=1",
        "--dropout=0.1",
        "--lr_decay_iters=40",
        "--eval_interval=15",
    ]
    run_script("train.py", *common_args, "--out_dir=straight", "--max_iters=40", cwd=tmp_path)
    run_script("train.py", *common_args, "--out_dir=split", "--max_iters=20", cwd=tmp_path)
    out = run_script("train.py", *common_args, "--out_dir=split", "--max_iters=40", "--init_from=resume", cwd=tmp_path)
    assert "resuming split/last.pth at iteration 20" in out.stdout
    straight, split = losses_by_iter(tmp_path / "straight"), losses_by_iter(tmp_path / "split")
    assert sorted(straight) == sorted(split) == list(range(1, 41))
    assert [split[i] for i in range(21, 41)] == [straight[i] for i in range(21, 41)]
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tiny_run, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            TINY,
            f"--data_dir={tiny_run / 'data'}",
            "--out_dir=out",
            "--max_iters=100000",
            "--log_interval=5",
            "--eval_interval=100000",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("iter "):  # training is under way
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "(interrupted)" in stdout and "saved out/last.pth at iteration" in stdout
    assert "continue with python train.py" in stderr and "--init_from=resume" in stderr
    saved = torch.load(tmp_path / "out" / "last.pth", weights_only=True)["iter_num"]
    assert not (tmp_path / "out" / "trained.pth").exists()  # no evaluation yet: no best model
    assert 5 <= saved < 100000
    out = run_script(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--out_dir=out",
        "--init_from=resume",
        f"--max_iters={saved + 10}",
        cwd=tmp_path,
    )
    assert f"resuming out/last.pth at iteration {saved}" in out.stdout
    assert torch.load(tmp_path / "out" / "last.pth", weights_only=True)["iter_num"] == saved + 10
    assert torch.load(tmp_path / "out" / "trained.pth", weights_only=True)["iter_num"] == saved + 10


class Evil:
    """Pickles to a call of os.system: what an unsafe torch.load would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = torch.load(tiny_run / "out" / "trained.pth", weights_only=True)
    checkpoint["train_config"]["payload"] = Evil(marker)
    os.makedirs(tmp_path / "out")
    torch.save(checkpoint, tmp_path / "out" / "trained.pth")
    with pytest.raises(pickle.UnpicklingError):  # the payload is real: a plain load would run it
        torch.load(tmp_path / "out" / "trained.pth", weights_only=True)
    for script, args in (
        ("sample.py", ["--ckpt=out/trained.pth"]),
        (
            "train.py",
            [
                TINY,
                f"--data_dir={tiny_run / 'data'}",
                "--out_dir=out",
                "--init_from=resume",
                "--max_iters=100",
            ],
        ),
    ):
        result = run_script(script, *args, cwd=tmp_path, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            "error: out/trained.pth holds objects other than tensors and plain values (posix.system), "
            "refused for safety: only load checkpoints you trust"
        )
        assert not marker.exists()


def test_optimizer_state_of_an_older_checkpoint_is_translated_to_parameter_names():
    """Checkpoints written before the optimizer state was keyed by name numbered the parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from model import GPT, GPTConfig
    from tensegpt.checkpoint import optimizer_state_by_name
    from tensegpt.optim import configure_optimizers

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True))
    [optimizer] = configure_optimizers(model, 1e-3, 0.1, (0.9, 0.99))
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    named = get_optimizer_state_dict(model, [optimizer], options=StateDictOptions(full_state_dict=True))
    translated = optimizer_state_by_name(optimizer.state_dict(), model)  # the numbered layout
    assert sorted(translated["state"]) == sorted(named["state"]) == sorted(name for name, _ in model.named_parameters())
    for name, state in named["state"].items():
        assert torch.equal(translated["state"][name]["exp_avg"], state["exp_avg"]), name
    assert [g["params"] for g in translated["param_groups"]] == [g["params"] for g in named["param_groups"]]
    assert optimizer_state_by_name(named, model) is named  # already by name: unchanged
