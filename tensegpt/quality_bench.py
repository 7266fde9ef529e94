"""
bench.py's quality sections: whole training runs (prepare.py, train.py, eval.py as the user
runs them, each in its own process) scored on held-out text. bench_quality compares
vocabularies and --example settings (--heldout), bench_switches the modern-block switches
(--switch_steps); see bench.py's docstring, items 5 and 6.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from tensegpt import tokenizer as tok
from tensegpt.checkpoint import load_model
from tensegpt.common import UserError
from tensegpt.loss_eval import held_out_loss
from tensegpt.runlog import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"{script} {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


# (name, prepare.py options): what --min_frequency, --full_vocab and --example cost on held-out text
QUALITY_VARIANTS = [
    ("compact, every train token", ["--example=paragraph", "--min_frequency=1"]),
    ("compact, --min_frequency=2", ["--example=paragraph", "--min_frequency=2"]),
    ("compact, --min_frequency=4", ["--example=paragraph"]),
    ("full GPT-2 vocabulary", ["--example=paragraph", "--full_vocab=True"]),
    ("compact, --example=line", ["--example=line"]),
    ("compact, --example=file", ["--example=file"]),
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
    for name, options in QUALITY_VARIANTS:
        with tempfile.TemporaryDirectory() as folder:
            run_script(
                "prepare.py",
                f"--input={text}",
                f"--out_dir={folder}/data",
                "--split=last",
                "--val_fraction=0.1",
                *options,
            )
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
    ("all (config/modern.py)", [os.path.join(ROOT, "config", "modern.py")]),
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
