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
It is a benchmark, not a test: nothing here asserts a speed.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

from common import main_guard, parse_config, pick_device
from model import GPT, GPTConfig, configure_optimizer
from train import DEFAULTS as TRAIN_DEFAULTS
from train import MODEL_KEYS, Batches, measure_peak_flops, pick_dtype, train_step

DEFAULTS = {
    "config": "config/small.py",
    "input": "tense.txt",
    "device": "auto",
    "dtype": "float32",
    "warmup_steps": 5,
    "timed_steps": 20,
    "gen_tokens": 500,
    "gen_block_size": 512,  # the generation model's context (>= gen_tokens + 1 keeps it all cached)
    "prepare_mb": 50,
    "json": False,
}
HERE = os.path.dirname(os.path.abspath(__file__))


def prepare_data(path, folder, full_vocab):
    subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--input={path}", f"--out_dir={folder}",
                    f"--full_vocab={full_vocab}"], check=True, capture_output=True)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r"), meta["vocab_size"]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(train_config, data, vocab_size, device, dtype, warmup, timed, peak):
    torch.manual_seed(0)
    model_config = GPTConfig(vocab_size=-(-vocab_size // 64) * 64, **{k: train_config[k] for k in MODEL_KEYS})
    model = GPT(model_config).to(device)
    optimizer = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.99), device.split(":")[0])
    batches = Batches(data, train_config["batch_size"], train_config["block_size"], device, seed=0,
                      grad_accum=train_config["grad_accum"])
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    times = []
    for step in range(warmup + timed):
        start = time.perf_counter()
        train_step(model, optimizer, scaler, batches, 1e-3, train_config, autocast)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_sec = train_config["batch_size"] * train_config["block_size"] * train_config["grad_accum"] / seconds
    return {"vocab_size": model_config.vocab_size, "params_M": model.num_params() / 1e6, "ms_per_iter": 1000 * seconds,
            "tokens_per_sec": tokens_per_sec, "mfu": model.estimate_mfu(tokens_per_sec, peak)}


@torch.no_grad()
def bench_generation(train_config, vocab_size, block_size, new_tokens, device):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=-(-vocab_size // 64) * 64, **{**{k: train_config[k] for k in MODEL_KEYS}, "block_size": block_size})
    model = GPT(config).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    result = {"block_size": block_size, "new_tokens": new_tokens}
    for name, use_cache in (("kv_cache", True), ("full_recompute", False)):
        model.generate(prompt, 8, greedy=True, use_cache=use_cache)  # warm-up
        rates = []
        for _ in range(3):  # the median of three runs
            sync(device)
            start = time.perf_counter()
            out = model.generate(prompt, new_tokens, greedy=True, use_cache=use_cache)
            sync(device)
            rates.append((out.size(1) - 1) / (time.perf_counter() - start))
        result[f"{name}_tokens_per_sec"] = statistics.median(rates)
    # ms for one new token with a cache that holds `position` tokens
    for position in (50, 500):
        if position + 1 > block_size:
            continue
        caches = model.new_caches(1)
        model(torch.randint(0, vocab_size, (1, position), device=device), caches=caches, pos=0)
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            model(token, caches=caches, pos=position)
            sync(device)
            times.append(time.perf_counter() - start)
        result[f"ms_per_token_at_{position}"] = 1000 * statistics.median(times)
    return result


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
        runner = ("import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__'); "
                  "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", runner, os.path.join(HERE, "prepare.py"), f"--input={big}",
                               f"--out_dir={folder}/data"], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    peak_kb = int(done.stdout.split()[-1])
    return {"megabytes": size / 1e6, "seconds": seconds, "mb_per_sec": size / 1e6 / seconds,
            "peak_memory_mb": peak_kb / 1024, "threads": os.cpu_count()}


def main():
    opts = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    train_config = parse_config(TRAIN_DEFAULTS, [opts["config"]])
    device = pick_device(opts["device"])
    dtype = pick_dtype(opts["dtype"], device)
    report = {"device": device, "dtype": dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "config": opts["config"]}

    report["matmul_peak_gflops"] = {name: measure_peak_flops(device, getattr(torch, name), seconds=1.0) / 1e9
                                    for name in ("float32", "bfloat16")}
    peak = report["matmul_peak_gflops"][dtype] * 1e9

    with tempfile.TemporaryDirectory() as folder:
        compact_data, compact_vocab = prepare_data(opts["input"], os.path.join(folder, "compact"), False)
        full_data, full_vocab = prepare_data(opts["input"], os.path.join(folder, "full"), True)
        report["train_compact"] = bench_training(train_config, compact_data, compact_vocab, device, dtype,
                                                 opts["warmup_steps"], opts["timed_steps"], peak)
        report["train_full"] = bench_training(train_config, full_data, full_vocab, device, dtype,
                                              opts["warmup_steps"], opts["timed_steps"], peak)
    report["train_speedup"] = report["train_compact"]["tokens_per_sec"] / report["train_full"]["tokens_per_sec"]
    gen = bench_generation(train_config, compact_vocab, opts["gen_block_size"], opts["gen_tokens"], device)
    gen["speedup"] = gen["kv_cache_tokens_per_sec"] / gen["full_recompute_tokens_per_sec"]
    if "ms_per_token_at_500" in gen:
        gen["ratio_500_to_50"] = gen["ms_per_token_at_500"] / gen["ms_per_token_at_50"]
    report["generation"] = gen
    if opts["prepare_mb"] > 0:
        report["prepare"] = bench_prepare(opts["input"], opts["prepare_mb"])

    if opts["json"]:
        print(json.dumps(report, indent=1))
        return
    c, f = report["train_compact"], report["train_full"]
    print(f"device {device}, {dtype}, torch {report['torch']}, {report['threads']} threads, {opts['config']}")
    print(f"{'matmul peak (torch.mm)':34} float32 {report['matmul_peak_gflops']['float32']:8.1f} GFLOP/s   "
          f"bfloat16 {report['matmul_peak_gflops']['bfloat16']:8.1f} GFLOP/s")
    print(f"{'training':34} {'compact vocab':>16} {'full vocab':>16} {'ratio':>8}")
    print(f"{'  vocab rows':34} {c['vocab_size']:>16,} {f['vocab_size']:>16,}")
    print(f"{'  parameters (M)':34} {c['params_M']:>16.2f} {f['params_M']:>16.2f}")
    print(f"{'  ms/iter (median)':34} {c['ms_per_iter']:>16.1f} {f['ms_per_iter']:>16.1f}")
    print(f"{'  tokens/s':34} {c['tokens_per_sec']:>16,.0f} {f['tokens_per_sec']:>16,.0f} {report['train_speedup']:>7.1f}x")
    print(f"{'  MFU (of the measured peak)':34} {100 * c['mfu']:>15.1f}% {100 * f['mfu']:>15.1f}%")
    print(f"{'generation':34} {'KV cache':>16} {'full recompute':>16} {'ratio':>8}")
    label = f"  tokens/s ({gen['new_tokens']} new, block {gen['block_size']})"
    print(f"{label:34} {gen['kv_cache_tokens_per_sec']:>16,.0f} {gen['full_recompute_tokens_per_sec']:>16,.0f} {gen['speedup']:>7.1f}x")
    if "ratio_500_to_50" in gen:
        print(f"{'  ms/token at position 50, 500':34} {gen['ms_per_token_at_50']:>16.2f} {gen['ms_per_token_at_500']:>16.2f} "
              f"{gen['ratio_500_to_50']:>7.2f}x")
    if "prepare" in report:
        p = report["prepare"]
        print(f"{'prepare':34} {p['megabytes']:.0f} MB in {p['seconds']:.1f} s: {p['mb_per_sec']:.1f} MB/s, "
              f"peak memory {p['peak_memory_mb']:.0f} MB, {p['threads']} threads")


if __name__ == "__main__":
    main_guard(main)
