"""The whole pipeline through the real command lines: prepare -> train -> sample."""

import json

import pytest
import torch
from helpers import ROOT, run_script, tense_lines

from model import GPT, GPTConfig
from tensegpt import checkpoint as ckpt
from tensegpt.checkpoint import load_model


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_brings_the_loss_down(tiny_run):
    evals = [m for m in read_metrics(tiny_run / "out") if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 25, 50, 60]
    assert evals[0]["val_loss"] > 6.0  # about ln(vocab) at the start
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5
    steps = [m for m in read_metrics(tiny_run / "out") if "loss" in m]
    assert steps[-1]["iter"] == 60 and steps[-1]["tokens_per_sec"] > 0 and 0 < steps[-1]["mfu"] < 1
    checkpoint = torch.load(tiny_run / "out" / "trained.pth", weights_only=True)
    assert checkpoint["iter_num"] == 60 and checkpoint["tokenizer_meta"]["tokenizer"] == "gpt2-compact"
    assert checkpoint["model_config"]["n_embd"] == 32 and checkpoint["train_config"]["max_iters"] == 60


def test_sample_continues_the_prompt(tiny_run):
    out = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        "--start=The baby is",
        "--num_samples=3",
        "--max_new_tokens=20",
        cwd=tiny_run,
    ).stdout
    samples = out.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 3
    for sample in samples:
        assert sample.startswith("The baby is") and len(sample) > len("The baby is")
        assert "<|endoftext|>" not in sample


def test_same_seed_same_text_other_seed_other_text(tiny_run):
    args = ["--ckpt=out/trained.pth", "--start=She", "--num_samples=2", "--max_new_tokens=15"]
    a = run_script("sample.py", *args, "--seed=1", cwd=tiny_run).stdout
    b = run_script("sample.py", *args, "--seed=1", cwd=tiny_run).stdout
    c = run_script("sample.py", *args, "--seed=2", cwd=tiny_run).stdout
    assert a == b and a != c


def test_prompt_from_file_and_greedy(tiny_run):
    (tiny_run / "prompt.txt").write_text("My sister", encoding="utf-8")
    (tiny_run / "prompt-echo.txt").write_text("My sister\n", encoding="utf-8")  # as echo writes it
    result = run_script("sample.py", "--ckpt=out/trained.pth", "--start=FILE:prompt.txt", "--greedy", cwd=tiny_run)
    assert result.stdout.startswith("My sister") and "---" not in result.stdout  # greedy: one text, printed once
    assert result.stderr.strip() == "note: --greedy gives the same text every time, so it is printed once (not 3 times)"
    echoed = run_script("sample.py", "--ckpt=out/trained.pth", "--start=FILE:prompt-echo.txt", "--greedy", cwd=tiny_run)
    assert echoed.stdout == result.stdout  # the file's last line break is not part of the prompt


def test_empty_prompt_starts_a_new_sentence(tiny_run):
    out = run_script("sample.py", "--ckpt=out/trained.pth", "--num_samples=1", "--max_new_tokens=30", cwd=tiny_run)
    assert out.stdout.strip() and "<|endoftext|>" not in out.stdout
    help_text = run_script("sample.py", "--help", cwd=tiny_run).stdout
    assert "empty --start" in help_text and "end-of-text token" in help_text


def test_checkpoint_save_then_load_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True, pos_encoding="sinusoidal"
    )
    model = GPT(config).eval()
    from dataclasses import asdict

    ckpt.save(
        {
            "model": model.state_dict(),
            "model_config": asdict(config),
            "tokenizer_meta": {"tokenizer": "gpt2"},
        },
        str(tmp_path / "trained.pth"),
    )
    loaded, tokenizer, _ = load_model(str(tmp_path / "trained.pth"))
    idx = torch.randint(0, 320, (2, 16))
    assert torch.equal(model(idx, idx)[0], loaded(idx, idx)[0])
    assert tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_bench_json_report(tmp_path):
    """bench.py end to end on a tiny config (a report's shape and its ratios, never a speed)."""
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(400)) + "\n")
    out = run_script(
        "bench.py",
        "--json",
        "--config=config/tiny.py",
        f"--input={tmp_path / 'in.txt'}",
        "--warmup_steps=1",
        "--timed_steps=2",
        "--gen_tokens=20",
        "--gen_block_size=64",
        "--prepare_mb=1",
        "--decode_tokens=0",  # GPT-2 124M's generation: tests/test_decode.py runs it on a small GPT-2
        cwd=ROOT,
        timeout=300,
    ).stdout
    report = json.loads(out)
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["train_compact"]["vocab_size"] < 2048 and report["train_full"]["vocab_size"] == 50304
    assert report["train_speedup"] == report["train_compact"]["tokens_per_sec"] / report["train_full"]["tokens_per_sec"]
    gen = report["generation"]
    assert (
        gen["new_tokens"] == 20
        and gen["speedup"] == gen["kv_cache_tokens_per_sec"] / gen["full_recompute_tokens_per_sec"]
    )
    assert "ms_per_token_at_50" in gen and "ms_per_token_at_500" not in gen  # 500 does not fit a 64-token context
    assert report["prepare"]["megabytes"] > 0.9 and report["prepare"]["peak_memory_mb"] > 0
    # tiny.py's 8 x 32 rows of logits are small: the model keeps the plain loss; the shapes compare all three
    assert not report["train_full"]["chunked_loss"] and not report["train_full_plain_loss"]["chunked_loss"]
    assert not report["train_compact"]["chunked_loss"] and report["train_full"]["peak_memory_mb"] > 0
    shapes = report["training_shapes"]
    assert set(shapes) == {"nanogpt", "small"} and shapes["nanogpt"]["train_py_uses"] == "plain"
    assert shapes["small"]["train_py_uses"] == ("chunked" if shapes["small"]["train.py"]["chunked_loss"] else "plain")
    for step in shapes.values():
        assert not step["plain"]["chunked_loss"]
        assert step["transformers"]["params_M"] == pytest.approx(step["plain"]["params_M"], rel=0.05)
    assert "decoding" not in report
    assert set(gen["sampled_tokens_per_sec"]) == {"compact", "full"} and "heldout" not in report
