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
   tokenizers) for: the compact vocabulary with the old byte fallback, the compact
   vocabulary closed under GPT-2's merges with every train token, with the tokens seen
   at least twice or four times (today's default), GPT-2's full vocabulary, and the
   three --example settings.
6. with --switch_steps=N, what each modern-block switch buys (model.py's docstring): the
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
It is a benchmark, not a test: nothing here asserts a speed.
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

from model import GPT
from tensegpt import tokenizer as tok
from tensegpt.checkpoint import load_model
from tensegpt.chunked_loss import ChunkedLoss, use_chunked_loss
from tensegpt.common import UserError, atomic_write, main_guard, parse_config, pick_device, script_defaults
from tensegpt.decode_bench import bench_checkpoint_pair, bench_decoding, print_decoding, sync, tokens_per_sec
from tensegpt.hardware import autocast_for, estimate_mfu, measure_peak_flops, pick_dtype
from tensegpt.loss_eval import held_out_loss
from tensegpt.optim import configure_optimizers
from tensegpt.run_setup import gpt_config_for
from tensegpt.runlog import read_metrics

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


def run_script(script, *args):
    done = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"{script} {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


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
    kind: 'train.py' (the loss train.py chooses for the shape), 'chunked' or 'plain' loss,
    or 'transformers' (GPT2LMHeadModel of the same dims: a plain reference).
    """
    torch.manual_seed(0)
    gpt_config = gpt_config_for(train_config, vocab_size)
    B, T, accum = train_config["batch_size"], train_config["block_size"], train_config["grad_accum"]
    gpt = ReferenceGPT(gpt_config) if kind == "transformers" else GPT(gpt_config)
    gpt = gpt.to(device)
    chunked = use_chunked_loss(gpt_config.vocab_size, B * T) if kind == "train.py" else kind == "chunked"
    model = ChunkedLoss(gpt) if chunked else gpt  # what train.py trains through
    measure_memory = device == "cpu" and reset_peak_memory()
    optimizers = configure_optimizers(gpt, 1e-3, 0.1, (0.9, 0.99))
    autocast, scaler = autocast_for(device, dtype)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + timed):
        start = time.perf_counter()
        for _ in range(accum):
            starts = torch.randint(len(data) - T, (B, 1), generator=generator).numpy()
            windows = torch.from_numpy(data[starts + np.arange(T + 1)].astype(np.int64)).to(device)  # (B, T+1)
            x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
            with autocast:
                loss = model(x, y)[1] / accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizers[0])
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        scaler.step(optimizers[0])
        scaler.update()
        optimizers[0].zero_grad(set_to_none=True)
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
            )  # fmt: skip
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
                for kind in ("chunked", "plain", "transformers")}  # fmt: skip
        step["train_py_uses"] = (
            "chunked" if use_chunked_loss(vocab_size, config["batch_size"] * config["block_size"]) else "plain"
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


def legacy_compact(folder):
    """
    Rewrites a prepared compact folder with the old compact vocabulary: the train split's
    GPT-2 tokens, the 256 bytes and end-of-text, anything else spelled in single bytes.
    """
    meta = tok.read_meta(folder)
    new = tok.from_meta(meta)
    gpt2_ids = np.array(new.gpt2_ids)
    train = gpt2_ids[np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)]  # the same tokens, GPT-2's ids
    old = tok.CompactGPT2(sorted(set(np.unique(train).tolist()) | set(tok.single_byte_ids()) | {tok.GPT2_EOT}), "bytes")
    to_old = np.zeros(tok.GPT2_EOT + 1, dtype=np.uint16)
    to_old[old.gpt2_ids] = np.arange(old.vocab_size)
    texts = tok.decode_examples(new, np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16))
    data = {"train": to_old[train], "val": tok.encode_examples(old, texts)}
    for split, arr in data.items():
        atomic_write(os.path.join(folder, f"{split}.bin"), arr.tofile)
    meta.update(
        old.meta(),
        vocab_size=old.vocab_size,
        eot=old.eot,
        train_tokens=len(data["train"]),
        val_tokens=len(data["val"]),
    )
    atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta).encode()))


QUALITY_VARIANTS = [  # (name, prepare.py options, old byte fallback)
    ("compact, byte fallback (first)", ["--example=paragraph", "--min_frequency=1"], True),
    ("compact, every train token", ["--example=paragraph", "--min_frequency=1"], False),
    ("compact, --min_frequency=2", ["--example=paragraph", "--min_frequency=2"], False),
    ("compact, --min_frequency=4 (now)", ["--example=paragraph"], False),
    ("full GPT-2 vocabulary", ["--example=paragraph", "--full_vocab=True"], False),
    ("compact, --example=line", ["--example=line"], False),
    ("compact, --example=file", ["--example=file"], False),
]


def score_held_out(ckpt, data_dir):
    """(model, held-out figures: val loss, bits per byte, ..., vocabulary) of a checkpoint on a val split."""
    model, tokenizer, _ = load_model(ckpt)
    meta = tok.read_meta(data_dir)
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
    return model, {
        **held_out_loss(model, val, meta, tokenizer, batch_size=8),
        "vocab_size": meta["vocab_size"],
    }


def bench_quality(text, steps, config_path, dtype):
    """Bits per byte on the held-out last 10% of text after `steps` training steps, per variant."""
    results = {}
    for name, options, old_fallback in QUALITY_VARIANTS:
        with tempfile.TemporaryDirectory() as folder:
            run_script(
                "prepare.py",
                f"--input={text}",
                f"--out_dir={folder}/data",
                "--split=last",
                "--val_fraction=0.1",
                *options,
            )
            if old_fallback:
                legacy_compact(f"{folder}/data")
            start = time.perf_counter()
            run_script(
                "train.py",
                config_path,
                f"--data_dir={folder}/data",
                f"--out_dir={folder}/out",
                f"--max_iters={steps}",
                f"--eval_interval={steps}",
                f"--dtype={dtype}",
            )
            seconds = time.perf_counter() - start
            model, scores = score_held_out(f"{folder}/out/trained.pth", f"{folder}/data")
        results[name] = {
            "bits_per_byte": scores["bits_per_byte"],
            "vocab_size": scores["vocab_size"],
            "val_tokens": scores["val_tokens"],
            "train_seconds": seconds,
            "steps": steps,
        }
    return results


SWITCH_VARIANTS = [  # (name, train.py options): GPT-2's block, each switch alone, all of them
    ("GPT-2 block", []),
    ("rotary positions", ["--pos_encoding=rotary"]),
    ("RMSNorm", ["--norm=rmsnorm"]),
    ("SwiGLU", ["--activation=swiglu"]),
    ("squared ReLU", ["--activation=relu2"]),
    ("GQA (n_kv_head 1)", ["--n_kv_head=1"]),
    ("QK-norm", ["--qk_norm=True"]),
    ("Muon", ["--optimizer=muon"]),
    ("all (config/modern.py)", [os.path.join(HERE, "config", "modern.py")]),
]


def training_seconds(records):
    """{iteration: seconds of training steps before it} from metrics.jsonl records (not evaluations)."""
    clock, elapsed, last_iter = 0.0, {0: 0.0}, 0
    for r in records:  # a log line carries the ms/iter of the steps since the one before
        if "ms_per_iter" in r:
            clock += r["ms_per_iter"] / 1000 * (r["iter"] - last_iter)
            elapsed[r["iter"]], last_iter = clock, r["iter"]
    return elapsed


def best_loss_within(records, seconds):
    """The best val loss of the evaluations within `seconds` of training steps (trained.pth then)."""
    elapsed = training_seconds(records)
    return min(
        r["val_loss"] for r in records if "val_loss" in r and elapsed.get(r["iter"], float("inf")) <= seconds * 1.001
    )


def bench_switches(text, heldout, steps, config_path, dtype, eval_samples):
    """Each modern-block switch alone and all together, against GPT-2's block: see the docstring's item 6."""
    corpora = [("tense", [f"--input={text}"])] + (
        [("prose", [f"--input={heldout}", "--split=last", "--val_fraction=0.1", "--example=paragraph"])]
        if heldout
        else []
    )
    schedule = [
        f"--max_iters={steps}",
        f"--eval_interval={max(1, steps // 6)}",
        f"--log_interval={max(1, steps // 12)}",
        f"--dtype={dtype}",
    ]
    results = {name: {} for name, _ in SWITCH_VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        for corpus, options in corpora:
            run_script("prepare.py", *options, f"--out_dir={folder}/{corpus}")
            for i, (name, switches) in enumerate(SWITCH_VARIANTS):
                out = f"{folder}/{corpus}-{i}"
                run_script(
                    "train.py",
                    config_path,
                    *switches,
                    f"--data_dir={folder}/{corpus}",
                    f"--out_dir={out}",
                    *schedule,
                )
                records = read_metrics(f"{out}/metrics.jsonl")
                if corpus == "tense":  # eval.py scores val (bits per byte) and measures the grammar and the probe
                    model = load_model(f"{out}/trained.pth")[0]
                    done = run_script(
                        "eval.py",
                        f"--ckpt={out}/trained.pth",
                        f"--data_dir={folder}/tense",
                        f"--num_samples={eval_samples}",
                        "--json=True",
                        f"--picture={out}/probe.png",
                    )
                    report = json.loads(done.stdout)
                    row = {
                        k: report[k]
                        for k in (
                            "bits_per_byte",
                            "grammatical",
                            "tense_agreement",
                            "semantic_errors",
                            "probe_accuracy",
                        )
                        if k in report
                    }
                else:
                    model, scores = score_held_out(f"{out}/trained.pth", f"{folder}/{corpus}")
                    row = {"bits_per_byte": scores["bits_per_byte"]}
                results[name][corpus] = row
                row["records"] = records
                row["val_loss"] = min(r["val_loss"] for r in records if "val_loss" in r)
                row["tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in records if "tokens_per_sec" in r)
                row["seconds"] = max(training_seconds(records).values())
                results[name]["params_M"] = model.num_params() / 1e6
                results[name]["kv_cache_mb"] = (
                    sum(t.numel() * t.element_size() for cache in model.new_caches(1) for t in (cache.k, cache.v)) / 1e6
                )
        for corpus, _ in corpora:  # the same wall-clock: what the fastest variant needs for its steps
            budget = min(r[corpus]["seconds"] for r in results.values())
            for r in results.values():
                r[corpus]["val_loss_same_seconds"] = best_loss_within(r[corpus].pop("records"), budget)
                r[corpus]["same_seconds"] = budget
    return results


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
            "import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, "
            "os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__'); "
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
            f"--heldout={opts['heldout']} is not a file: pass a UTF-8 text, or leave it empty to skip the "
            "quality figures"
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
        # the same full-vocabulary run with the output layer and loss in one piece (no ChunkedLoss)
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
        return
    c, f, p = report["train_compact"], report["train_full"], report["train_full_plain_loss"]
    print(f"device {device}, {dtype}, torch {report['torch']}, {report['threads']} threads, {opts['config']}")
    print(
        f"{'matmul peak (torch.mm)':34} float32 {report['matmul_peak_gflops']['float32']:8.1f} GFLOP/s   "
        f"bfloat16 {report['matmul_peak_gflops']['bfloat16']:8.1f} GFLOP/s"
    )
    print(f"{'training':34} {'compact vocab':>16} {'full vocab':>16} {'ratio':>8} {'full, plain loss':>17}")
    print(f"{'  vocab rows':34} {c['vocab_size']:>16,} {f['vocab_size']:>16,} {'':>8} {p['vocab_size']:>17,}")
    print(f"{'  parameters (M)':34} {c['params_M']:>16.2f} {f['params_M']:>16.2f} {'':>8} {p['params_M']:>17.2f}")
    print(
        f"{'  ms/iter (median)':34} {c['ms_per_iter']:>16.1f} {f['ms_per_iter']:>16.1f} {'':>8} "
        f"{p['ms_per_iter']:>17.1f}"
    )
    print(
        f"{'  tokens/s':34} {c['tokens_per_sec']:>16,.0f} {f['tokens_per_sec']:>16,.0f} "
        f"{report['train_speedup']:>7.1f}x "
        f"{p['tokens_per_sec']:>17,.0f}"
    )
    print(
        f"{'  MFU (of the measured peak)':34} {100 * c['mfu']:>15.1f}% {100 * f['mfu']:>15.1f}% {'':>8} "
        f"{100 * p['mfu']:>16.1f}%"
    )
    if c["peak_memory_mb"] is not None:
        print(
            f"{'  peak resident memory (MB)':34} {c['peak_memory_mb']:>16,.0f} {f['peak_memory_mb']:>16,.0f} "
            f"{'':>8} "
            f"{p['peak_memory_mb']:>17,.0f}"
        )
    print(
        f"{'  chunked loss (full vocab)':34} {'on' if c['chunked_loss'] else 'off':>16} {'on':>16} {'':>8} "
        f"{'off':>17}   "
        f"chunked is {report['chunked_loss_speedup']:.2f}x the plain loss"
    )
    print(f"{'generation':34} {'KV cache':>16} {'full recompute':>16} {'ratio':>8}")
    label = f"  tokens/s ({gen['new_tokens']} new, block {gen['block_size']})"
    print(
        f"{label:34} {gen['kv_cache_tokens_per_sec']:>16,.0f} {gen['full_recompute_tokens_per_sec']:>16,.0f} "
        f"{gen['speedup']:>7.1f}x"
    )
    if "ratio_500_to_50" in gen:
        print(
            f"{'  ms/token at position 50, 500':34} {gen['ms_per_token_at_50']:>16.2f} "
            f"{gen['ms_per_token_at_500']:>16.2f} "
            f"{gen['ratio_500_to_50']:>7.2f}x"
        )
    sampled = gen["sampled_tokens_per_sec"]
    print(f"{'  sampled tokens/s, T=0.8':34} {'compact vocab':>16} {'full vocab':>16}")
    print(
        f"{'':34} {sampled['compact']:>16,.0f} {sampled['full']:>16,.0f} {sampled['compact'] / sampled['full']:>7.2f}x"
    )
    print_training_shapes(report)
    print_decoding(report)
    if "prepare" in report:
        p = report["prepare"]
        print(
            f"{'prepare':34} {p['megabytes']:.0f} MB in {p['seconds']:.1f} s: {p['mb_per_sec']:.1f} MB/s, "
            f"peak memory {p['peak_memory_mb']:.0f} MB, {p['threads']} threads"
        )
    if "heldout" in report:
        print(f"held-out quality: last 10% of {opts['heldout']}, {opts['quality_steps']} steps of {opts['config']}")
        print(f"{'':34} {'bits per byte':>16} {'vocab':>8} {'train time':>11}")
        for name, _, _ in QUALITY_VARIANTS:
            q = report["heldout"][name]
            print(f"{'  ' + name:34} {q['bits_per_byte']:>16.3f} {q['vocab_size']:>8,} {q['train_seconds']:>10.0f}s")
    if "switches" in report:
        print_switches(report["switches"], opts)


def print_training_shapes(report):
    """One full-vocabulary training step at each shape: chunked, plain, transformers."""
    for shape, step in report.get("training_shapes", {}).items():
        ms = {kind: step[kind]["ms_per_iter"] for kind in ("chunked", "plain", "transformers")}
        print(
            f"{'training step, ' + shape + ' shape':34} chunked {ms['chunked']:7.1f} ms   "
            f"plain {ms['plain']:7.1f} ms"
            f"   transformers {ms['transformers']:7.1f} ms   (train.py uses {step['train_py_uses']})"
        )


def print_switches(switches, opts):
    steps = opts["switch_steps"]
    first = next(iter(switches.values()))
    print(
        f"modern-block switches: {steps} steps of {opts['config']} on {opts['input']}"
        f" (best val loss in N steps, and in the {first['tense']['same_seconds']:.0f} s of training the "
        "fastest needs for them)"
    )
    print(
        f"{'':24} {'params M':>8} {'KV MB':>6} {'tok/s':>7} {'best val':>8} {'same time':>9} {'bits/B':>7} "
        f"{'gramm.':>7} "
        f"{'agree':>6} {'who-what':>8} {'probe':>6}"
    )
    pct = lambda row, key: f"{100 * row[key]:.1f}%" if key in row else "-"
    for name, r in switches.items():
        t = r["tense"]
        print(
            f"{name:24} {r['params_M']:>8.3f} {r['kv_cache_mb']:>6.2f} {t['tokens_per_sec']:>7,.0f} "
            f"{t['val_loss']:>8.4f} "
            f"{t['val_loss_same_seconds']:>9.4f} {t['bits_per_byte']:>7.4f} {pct(t, 'grammatical'):>7} "
            f"{pct(t, 'tense_agreement'):>6} "
            f"{pct(t, 'semantic_errors'):>8} {pct(t, 'probe_accuracy'):>6}"
        )
    if "prose" in first:
        print(
            f"held-out prose: {steps} steps on the first 90% of {opts['heldout']}, scored on the last 10% "
            f"(best val loss in N steps and in {first['prose']['same_seconds']:.0f} s)"
        )
        print(f"{'':24} {'tok/s':>7} {'best val':>8} {'same time':>9} {'bits/B':>7}")
        for name, r in switches.items():
            p = r["prose"]
            print(
                f"{name:24} {p['tokens_per_sec']:>7,.0f} {p['val_loss']:>8.4f} "
                f"{p['val_loss_same_seconds']:>9.4f} {p['bits_per_byte']:>7.4f}"
            )


if __name__ == "__main__":
    main_guard(main)
