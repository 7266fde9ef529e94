"""
Measures where the time goes, on this machine, in one run (ratios are what to compare).

    python bench.py                       # the table
    python bench.py --json                # the same as JSON
    python bench.py --config=config/small.py --device=cpu --dtype=float32 --prepare_mb=200

1. matmul peak: GFLOP/s of torch.mm at a size that saturates the device (float32, bfloat16)
2. training: ms/iter, tokens/s and MFU of the config's model on tense.txt, with the compact
   vocabulary and with GPT-2's full vocabulary, side by side (median of timed steps)
3. generation: tokens/s for gen_tokens new tokens with the KV cache and with full
   recompute (median of three runs), and ms per token at context positions 50 and 500
4. prepare: MB/s of prepare.py on a text of prepare_mb MB (tense.txt repeated), and the
   peak memory of that process
5. with --heldout=FILE, quality on text the model has not seen: prepare.py holds out the
   last 10% of FILE (--split=last), train.py trains the config for quality_steps steps,
   and the held-out text is scored in bits per byte (lower is better; comparable across
   tokenizers) for: the compact vocabulary with every train token, with the tokens seen
   at least twice or four times (the default --min_frequency), GPT-2's full vocabulary,
   and the three --example settings.
6. with --switch_steps=N, what each modern-block switch buys (GPTConfig in model.py): the
   config trained N steps on --input, and on --heldout if given, once with GPT-2's block,
   once per switch and once with all (config/modern.py); per variant the parameters,
   tokens/s, KV-cache size, the best val loss in N steps and in the same training seconds
   (what the fastest variant needs for N steps), and for trained.pth (the best val loss,
   what the other scripts load) held-out bits per byte and eval.py's grammar and probe
   figures for a tense.txt-like input.
7. with --shapes, one full-vocabulary training step at nanoGPT's shape and at the
   config's: the chunked loss, the plain loss, and transformers' GPT-2 of the same dims.
8. with --decode_tokens=N, GPT-2 124M's generation against transformers' generate in
   each precision, against the memory-bandwidth bound, and speculative decoding; with
   --ckpt and --draft, a trained pair too (tensegpt/decode_bench.py).
It is a benchmark, not a test: nothing here asserts a speed. Sections 5 and 6 live in
tensegpt/quality_bench.py, 8 in tensegpt/decode_bench.py, the tables in tensegpt/bench_report.py.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from model import GPT, LOGITS_MAX_BYTES
from tensegpt import tokenizer as tok
from tensegpt.bench_report import print_report
from tensegpt.common import UserError, main_guard, parse_config, pick_device, script_defaults
from tensegpt.decode_bench import bench_checkpoint_pair, bench_decoding, sync, tokens_per_sec
from tensegpt.hardware import autocast_for, estimate_mfu, measure_peak_flops, pick_dtype
from tensegpt.optim import configure_optimizers
from tensegpt.quality_bench import bench_quality, bench_switches, run_script
from tensegpt.run_setup import gpt_config_for
from train import Batches, train_step

DEFAULTS = {
    "config": "config/small.py",  # the training config whose model is measured
    "input": "tense.txt",  # the text prepared and trained on
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'mps'
    "dtype": "float32",  # 'float32', 'bfloat16', 'float16' or 'auto', as in train.py
    "warmup_steps": 5,  # untimed training steps first
    "timed_steps": 20,  # training steps timed (the median counts)
    "gen_tokens": 500,  # new tokens per generation run
    "gen_block_size": 512,  # the generation model's context (>= gen_tokens + 1 keeps it all cached)
    "prepare_mb": 50,  # size of the text prepare.py is timed on; 0 skips it
    "heldout": "",  # a text for the held-out quality figures (e.g. ../shared/data/alice.txt); empty: none
    "quality_steps": 200,  # training steps of each held-out quality run; 0 skips them
    "switch_steps": 0,  # training steps of each modern-block switch run; 0 skips them
    "eval_samples": 500,  # eval.py --num_samples for each switch run on tense.txt
    "shapes": True,  # a full-vocabulary training step at nanoGPT's and the config's shape, three ways
    "decode_tokens": 100,  # GPT-2 124M generation against transformers, in each precision; 0 skips
    "ckpt": "",  # a trained model, and with --draft a smaller one on the same tokens: speculative decoding
    "draft": "",  # the draft checkpoint for --ckpt
    "json": False,  # print the report as JSON
}
HERE = os.path.dirname(os.path.abspath(__file__))


def prepare_data(path, folder, full_vocab):
    run_script("prepare.py", f"--input={path}", f"--out_dir={folder}", f"--full_vocab={full_vocab}")
    meta = tok.read_meta(folder)
    return np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r"), meta["vocab_size"]


def reset_peak_memory():
    """Starts a new peak-resident-memory measurement of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def peak_memory_mb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def bench_training(train_config, data, vocab_size, device, dtype, warmup, timed, peak, kind="train.py"):
    """
    ms per training step (forward, backward, clipping, AdamW) of the config's model (median).
    kind: 'train.py' (the GPT's own loss: in chunks where its logits pass LOGITS_MAX_BYTES), 'plain' (the
    logits of every position, then one cross-entropy: PlainLoss), or 'transformers' (GPT2LMHeadModel of the same
    dims: a plain reference).
    """
    torch.manual_seed(0)
    gpt_config = gpt_config_for(train_config, vocab_size)
    B, T, accum = train_config["batch_size"], train_config["block_size"], train_config["grad_accum"]
    gpt = ReferenceGPT(gpt_config) if kind == "transformers" else GPT(gpt_config)
    gpt = gpt.to(device)
    chunked = kind == "train.py" and chunks_the_loss(gpt_config.vocab_size, B * T)
    model = PlainLoss(gpt) if kind == "plain" else gpt
    measure_memory = device == "cpu" and reset_peak_memory()
    optimizers = configure_optimizers(gpt, 1e-3, 0.1, (0.9, 0.99))
    autocast, scaler = autocast_for(device, dtype)
    batches = Batches(data, B, T, device, seed=0, grad_accum=accum)
    times = []
    for step in range(warmup + timed):
        start = time.perf_counter()
        train_step(model, optimizers, scaler, batches, 1e-3, train_config, autocast)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_sec = B * T * accum / seconds
    return {
        "vocab_size": gpt_config.vocab_size,
        "params_M": sum(p.numel() for p in gpt.parameters()) / 1e6,
        "ms_per_iter": 1000 * seconds,
        "tokens_per_sec": tokens_per_sec,
        "mfu": estimate_mfu(gpt, tokens_per_sec, peak) if kind != "transformers" else None,
        "chunked_loss": chunked,
        "peak_memory_mb": peak_memory_mb() if measure_memory else None,
    }


def chunks_the_loss(vocab_size, rows):
    """Whether model.py's forward computes the loss over `rows` targets in chunks (past LOGITS_MAX_BYTES)."""
    return rows * vocab_size * 4 > LOGITS_MAX_BYTES


class PlainLoss(torch.nn.Module):
    """The GPT's logits at every position, through its front door, then one cross-entropy: the loss in one piece."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets):
        logits, _ = self.gpt(idx, logits_at=torch.arange(idx.numel(), device=idx.device))  # (B*T, V)
        return logits, torch.nn.functional.cross_entropy(logits, targets.flatten())


class ReferenceGPT(torch.nn.Module):
    """transformers' GPT2LMHeadModel, of a GPTConfig's dims: (idx, targets) -> (logits, loss)."""

    def __init__(self, config):
        import transformers

        super().__init__()
        self.hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=config.vocab_size,
                n_positions=config.block_size,
                n_embd=config.n_embd,
                n_layer=config.n_layer,
                n_head=config.n_head,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )

    def forward(self, idx, targets):
        logits = self.hf(idx).logits  # (B, T, V)
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bench_training_shapes(data, vocab_size, small_config, device, dtype, warmup, timed, peak):
    """ms per training step with GPT-2's full vocabulary at nanoGPT's CPU shape and at config/small.py's."""
    nanogpt = {**small_config, "n_layer": 4, "n_head": 4, "n_embd": 128, "batch_size": 12, "block_size": 64}
    nanogpt.update(grad_accum=1, dropout=0.0, bias=False)
    result = {}
    for shape, config in (("nanogpt", nanogpt), ("small", small_config)):
        step = {kind: bench_training(config, data, vocab_size, device, dtype, warmup, timed, peak, kind)
                for kind in ("train.py", "plain", "transformers")}  # fmt: skip
        step["train_py_uses"] = (
            "chunked" if chunks_the_loss(vocab_size, config["batch_size"] * config["block_size"]) else "plain"
        )
        result[shape] = step
    return result


@torch.no_grad()
def bench_generation(train_config, vocab_size, block_size, new_tokens, device):
    torch.manual_seed(0)
    model = GPT(gpt_config_for({**train_config, "block_size": block_size}, vocab_size)).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    result = {"block_size": block_size, "new_tokens": new_tokens}
    for name, use_cache in (("kv_cache", True), ("full_recompute", False)):

        def generate(n, use_cache=use_cache):
            return model.generate(prompt, n, greedy=True, use_cache=use_cache).size(1) - 1

        result[f"{name}_tokens_per_sec"] = tokens_per_sec(generate, new_tokens, device)
    # ms for one new token with a cache that holds `position` tokens
    for position in (50, 500):
        if position + 1 > block_size:
            continue
        caches = model.new_caches(1)
        model(torch.randint(0, vocab_size, (1, position), device=device), caches=caches)
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            model(token, caches=caches, input_pos=position)
            sync(device)
            times.append(time.perf_counter() - start)
        result[f"ms_per_token_at_{position}"] = 1000 * statistics.median(times)
    return result


@torch.no_grad()
def bench_sampling(train_config, vocab_sizes, block_size, new_tokens, device):
    """Tokens/s of sample.py's default decoding (temperature 0.8, KV cache) for each vocabulary size."""
    rates = {}
    for name, vocab_size in vocab_sizes.items():
        torch.manual_seed(0)
        model = GPT(gpt_config_for({**train_config, "block_size": block_size}, vocab_size)).to(device).eval()
        prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(0)

        def generate(n, model=model, prompt=prompt, generator=generator):
            return model.generate(prompt, n, temperature=0.8, generator=generator).size(1) - 1

        rates[name] = tokens_per_sec(generate, new_tokens, device)
    return rates


def bench_prepare(source, megabytes):
    with open(source, "rb") as f:
        text = f.read()
    with tempfile.TemporaryDirectory() as folder:
        big = os.path.join(folder, "big.txt")
        with open(big, "wb") as f:
            for _ in range(max(1, round(megabytes * 1e6 / len(text)))):
                f.write(text)
        size = os.path.getsize(big)
        # prepare.py in a child process that reports its own peak resident memory (VmHWM:
        # unlike getrusage's maxrss, it does not count the memory of this process it forked from)
        runner = (
            "import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
        )
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                runner,
                os.path.join(HERE, "prepare.py"),
                f"--input={big}",
                f"--out_dir={folder}/data",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    peak_kb = int(done.stdout.split()[-1])
    return {
        "megabytes": size / 1e6,
        "seconds": seconds,
        "mb_per_sec": size / 1e6 / seconds,
        "peak_memory_mb": peak_kb / 1024,
        "threads": os.cpu_count(),
    }


def check_options(opts):
    for key, least in (
        ("warmup_steps", 0),
        ("timed_steps", 1),
        ("gen_tokens", 1),
        ("gen_block_size", 2),
        ("prepare_mb", 0),
        ("quality_steps", 0),
        ("switch_steps", 0),
        ("eval_samples", 1),
    ):
        if opts[key] < least:
            raise UserError(f"--{key} must be at least {least}, got {opts[key]}")
    if not os.path.isfile(opts["input"]):
        raise UserError(f"--input={opts['input']} is not a file: pass a UTF-8 text, like tense.txt")
    if opts["heldout"] and not os.path.isfile(opts["heldout"]):
        raise UserError(
            f"--heldout={opts['heldout']} is not a file: pass a UTF-8 text, "
            "or leave it empty to skip the quality figures"
        )


def main():
    opts = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_options(opts)
    train_config = parse_config(script_defaults(os.path.join(HERE, "train.py")), [opts["config"]])
    device = pick_device(opts["device"])
    dtype = pick_dtype(opts["dtype"], device)
    report = {
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": opts["config"],
        "ckpt": opts["ckpt"],
        "draft": opts["draft"],
    }

    report["matmul_peak_gflops"] = {
        name: measure_peak_flops(device, getattr(torch, name), seconds=1.0) / 1e9 for name in ("float32", "bfloat16")
    }
    peak = report["matmul_peak_gflops"][dtype] * 1e9

    with tempfile.TemporaryDirectory() as folder:
        compact_data, compact_vocab = prepare_data(opts["input"], os.path.join(folder, "compact"), False)
        full_data, full_vocab = prepare_data(opts["input"], os.path.join(folder, "full"), True)
        timing = (device, dtype, opts["warmup_steps"], opts["timed_steps"], peak)
        report["train_compact"] = bench_training(train_config, compact_data, compact_vocab, *timing)
        report["train_full"] = bench_training(train_config, full_data, full_vocab, *timing)
        # the same full-vocabulary run with the output layer and loss in one piece (PlainLoss)
        report["train_full_plain_loss"] = bench_training(train_config, full_data, full_vocab, *timing, "plain")
        if opts["shapes"]:
            report["training_shapes"] = bench_training_shapes(full_data, full_vocab, train_config, *timing)
        if opts["decode_tokens"]:
            val = np.fromfile(os.path.join(folder, "full", "val.bin"), dtype=np.uint16)
            report["decoding"] = bench_decoding(opts["decode_tokens"], val, device)
    if opts["ckpt"] and opts["draft"]:
        report["checkpoint_pair"] = bench_checkpoint_pair(opts["ckpt"], opts["draft"], opts["gen_tokens"], device)
    report["train_speedup"] = report["train_compact"]["tokens_per_sec"] / report["train_full"]["tokens_per_sec"]
    report["chunked_loss_speedup"] = (
        report["train_full"]["tokens_per_sec"] / report["train_full_plain_loss"]["tokens_per_sec"]
    )
    gen = bench_generation(train_config, compact_vocab, opts["gen_block_size"], opts["gen_tokens"], device)
    gen["speedup"] = gen["kv_cache_tokens_per_sec"] / gen["full_recompute_tokens_per_sec"]
    if "ms_per_token_at_500" in gen:
        gen["ratio_500_to_50"] = gen["ms_per_token_at_500"] / gen["ms_per_token_at_50"]
    gen["sampled_tokens_per_sec"] = bench_sampling(
        train_config,
        {"compact": compact_vocab, "full": full_vocab},
        opts["gen_block_size"],
        opts["gen_tokens"],
        device,
    )
    report["generation"] = gen
    if opts["prepare_mb"] > 0:
        report["prepare"] = bench_prepare(opts["input"], opts["prepare_mb"])
    if opts["heldout"] and opts["quality_steps"]:
        report["heldout"] = {
            "text": opts["heldout"],
            **bench_quality(opts["heldout"], opts["quality_steps"], opts["config"], dtype),
        }
    if opts["switch_steps"]:
        report["switches"] = bench_switches(
            opts["input"], opts["heldout"], opts["switch_steps"], opts["config"], dtype, opts["eval_samples"]
        )

    if opts["json"]:
        print(json.dumps(report, indent=1))
    else:
        print_report(report, opts)


if __name__ == "__main__":
    main_guard(main)
