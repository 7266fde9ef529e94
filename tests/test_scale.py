"""Scaling out on CPU: DDP through torchrun (gloo), mixed precision, activation checkpointing."""

import json
import os
import signal
import subprocess

import pytest
import torch
from helpers import ROOT, TORCHRUN_ENV, losses, run_script, torchrun, torchrun_command

from model import GPT, GPTConfig

TINY = os.path.join(ROOT, "config", "tiny.py")


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tiny_run, tmp_path):
    common = [
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--max_iters=6",
        "--grad_accum=2",
        "--log_interval=1",
        "--eval_interval=3",
    ]
    run_script("train.py", *common, "--out_dir=single", cwd=tmp_path)
    result = torchrun(*common, "--out_dir=ddp", cwd=tmp_path)
    # rank 0 alone prints and writes
    assert (
        result.stdout.count("model: ") == 1
        and result.stdout.count("saved ddp/last.pth and ddp/trained.pth at iteration 6") == 1
    )
    assert "global batch 512 tokens per iteration (2 process(es) x 1 micro-batch(es) x 8 x 32)" in result.stdout
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 6
    assert ddp[0] == pytest.approx(single[0], abs=1e-5)  # the same global batch, the same loss
    assert ddp == pytest.approx(single, abs=1e-3)
    checkpoint = torch.load(tmp_path / "ddp" / "trained.pth", weights_only=True)
    assert checkpoint["iter_num"] == 6 and not any(k.startswith("module.") for k in checkpoint["model"])
    sampled = run_script(
        "sample.py",
        "--ckpt=ddp/trained.pth",
        "--start=The baby",
        "--num_samples=1",
        "--max_new_tokens=5",
        cwd=tmp_path,
    )
    assert sampled.stdout.startswith("The baby")


def test_ddp_error_on_every_rank_exits_without_hanging(tiny_run, tmp_path):
    result = torchrun(
        TINY, f"--data_dir={tiny_run / 'data'}", "--max_iters=4", cwd=tmp_path, check=False
    )  # grad_accum 1 cannot split in 2
    assert result.returncode != 0
    assert result.stderr.count("error: grad_accum (1) must be a multiple of the number of processes (2)") == 1


def test_ctrl_c_in_a_terminal_stops_every_rank_at_one_step_and_saves(tiny_run, tmp_path):
    command = torchrun_command(
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--out_dir=out",
        "--grad_accum=2",
        "--max_iters=100000",
        "--log_interval=5",
        "--eval_interval=100000",
    )
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=TORCHRUN_ENV,
        start_new_session=True,
    )
    for line in proc.stdout:
        if line.startswith("iter "):  # training is under way
            break
    # a terminal's Ctrl-C reaches torchrun and both ranks, and torchrun forwards it again:
    # each rank sees it twice, which must still mean "finish the step and save", not "die now"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert "saved out/last.pth at iteration" in stdout and "(interrupted)" in stdout, stderr
    assert "continue with python train.py" in stderr and "Connection closed by peer" not in stderr
    saved = torch.load(tmp_path / "out" / "last.pth", weights_only=True)["iter_num"]
    assert f"saved out/last.pth at iteration {saved} (interrupted)" in stdout and saved >= 5


def test_an_error_only_a_later_rank_hits_is_still_said(monkeypatch, capsys):
    from tensegpt import common

    def main():
        raise common.UserError("no data/train.bin on this machine")

    waits = []
    monkeypatch.setattr(
        common.time, "sleep", waits.append
    )  # the wait that lets rank 0 speak first when all ranks fail alike
    for rank, said in (
        ("0", "error: no data/train.bin on this machine\n"),
        ("1", "error (rank 1): no data/train.bin on this machine\n"),
    ):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            common.main_guard(main)
        assert exit_info.value.code == 1 and capsys.readouterr().err == said
    assert waits == [5]


def test_bfloat16_autocast_trains_on_cpu(tiny_run, tmp_path):
    out = run_script(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--dtype=bfloat16",
        "--out_dir=bf16",
        "--max_iters=40",
        "--log_interval=10",
        cwd=tmp_path,
    ).stdout
    assert "device cpu, bfloat16" in out
    evals = [
        json.loads(line)
        for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    weights = torch.load(tmp_path / "bf16" / "trained.pth", weights_only=True)
    assert all(t.dtype == torch.float32 for t in weights["model"].values())  # master weights stay float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in weights["optimizer"]["state"].values())


def test_float16_without_a_gpu_is_a_clear_error(tiny_run, tmp_path):
    result = run_script(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--dtype=float16",
        "--device=cpu",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: --dtype=float16 needs a CUDA GPU (device is cpu); use --dtype=bfloat16 or float32"
    )


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    _, loss_ckpt = model(idx, idx)
    loss_ckpt.backward()
    assert loss_ckpt.item() == pytest.approx(loss.item(), abs=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, model.parameters()))
