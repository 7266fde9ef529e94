"""
What a training run tells its user: the lines it prints (the run's description, progress,
memory) and out_dir/metrics.jsonl (one JSON object per log line and per evaluation),
drawn as out_dir/loss.png. A log is never a reason to stop: a failed write or drawing is
a warning and training goes on.
"""

import json
import math
import os
import sys

from tensegpt.common import UserError, atomic_write, pyplot, save_figure
from tensegpt.hardware import estimate_mfu


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLog:
    """
    What a run prints and writes. Under torchrun only rank 0 (master) prints and writes;
    the other ranks call the same methods, which do nothing for them.
    """

    def __init__(self, config, master):
        self.config, self.master = config, master
        self.out_dir = config["out_dir"]
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.flops_of = None  # tokens/s -> model FLOPs utilisation, once describe() has seen the model

    def say(self, text, file=None):
        if self.master:
            print(text, file=file, flush=True)

    def interrupted(self, argv):
        """After Ctrl-C: the command that goes on from last.pth."""
        args = [a for a in argv if not a.startswith(("--init_from", "--overwrite"))]
        self.say(f"interrupted: continue with python train.py {' '.join(args)} --init_from=resume", sys.stderr)

    def done(self, best_val_loss, seconds, best_path, last_path):
        """The run's last lines: the best val loss, the time, and how to sample from the best model."""
        self.say(
            f"done: best val loss {best_val_loss:.4f}, {format_seconds(seconds)}; "
            f"{best_path} is the best model, {last_path} the latest state"
        )
        ckpt_flag = "" if best_path == os.path.join("out", "trained.pth") else " --ckpt=" + best_path
        self.say(f"sample from it: python sample.py{ckpt_flag}")

    def new_log(self):
        """An empty metrics.jsonl: a new run starts a new log (a resumed one appends)."""
        if self.master:
            atomic_write(self.metrics_path, lambda f: None)

    def describe(self, model, tokenizer_meta, device, dtype, world_size, peak):
        """The line before the first step: model, device, layout, batch, matmul peak."""
        c = self.config
        layout = "FSDP" if c["fsdp"] else "DDP" if world_size > 1 else "one process"
        B, T, accum = c["batch_size"], c["block_size"], c["grad_accum"]
        self.flops_of = lambda tokens_per_sec: estimate_mfu(model, tokens_per_sec, peak * world_size)
        self.say(
            f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size} "
            f"({tokenizer_meta['tokenizer']}); device {device}, {dtype}{', compiled' if c['compile'] else ''}, "
            f"{layout}; global batch {B * T * accum:,} tokens per iteration "
            f"({world_size} process(es) x {accum // world_size} micro-batch(es) x {B} x {T}); "
            f"matmul peak {peak / 1e9:.0f} GFLOP/s"
        )

    def memory(self, model, optimizers):
        """This process's share of weights, gradients and optimizer state (a shard's under FSDP)."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own part
        size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts) / 1e6
        params = list(model.parameters())
        states = [v for opt in optimizers for s in opt.state.values() for v in s.values() if hasattr(v, "numel")]
        grads = size(p.grad for p in params if p.grad is not None)
        self.say(
            f"memory per process: weights {size(params):.1f} MB, gradients {grads:.1f} MB, "
            f"optimizer state {size(states):.1f} MB"
        )

    def progress(self, iter_num, losses, lr, seconds):
        """The line and metrics record for the steps since the last one; stops on a NaN or infinite loss."""
        c = self.config
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise UserError(
                f"loss became {losses[bad[0]]} at iteration {iter_num - len(losses) + bad[0] + 1}; "
                f"stopped without saving, {self.out_dir}/last.pth keeps the last good state; "
                f"try a lower --learning_rate (now {c['learning_rate']})"
            )
        dt = seconds / len(losses)
        tokens_per_sec = c["batch_size"] * c["block_size"] * c["grad_accum"] / dt
        mfu = self.flops_of(tokens_per_sec)
        eta = dt * (c["max_iters"] - iter_num)  # at the pace of the last log_interval iterations
        self.say(
            f"iter {iter_num}/{c['max_iters']} ({100 * iter_num / c['max_iters']:.0f}%) | loss {losses[-1]:.4f} | lr "
            f"{lr:.2e} | {1000 * dt:.1f} ms/iter, {1 / dt:.1f} it/s | {tokens_per_sec:,.0f} tok/s | MFU "
            f"{100 * mfu:.1f}% | ETA {format_seconds(eta)}"
        )
        self.append(
            {
                "iter": iter_num,
                "loss": losses[-1],
                "losses": losses,
                "lr": lr,
                "ms_per_iter": 1000 * dt,
                "tokens_per_sec": tokens_per_sec,
                "mfu": mfu,
            }
        )

    def evaluation(self, iter_num, losses):
        """The evaluation's line, its record in metrics.jsonl, and loss.png drawn again."""
        self.say(
            f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
            f"val perplexity {math.exp(losses['val']):.2f}"
        )
        self.append(
            {
                "iter": iter_num,
                "train_loss": losses["train"],
                "val_loss": losses["val"],
                "val_ppl": math.exp(losses["val"]),
            }
        )
        if not self.master:
            return
        try:
            plot_losses(self.metrics_path, os.path.join(self.out_dir, "loss.png"))
        except Exception as e:  # a picture must never stop training
            why = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
            print(f"warning: could not draw {self.out_dir}/loss.png ({why}); training goes on", file=sys.stderr)

    def append(self, record):
        if not self.master:
            return
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            print(
                f"warning: could not append to {self.metrics_path} ({e.strerror}); training goes on",
                file=sys.stderr,
            )


def read_metrics(path):
    """The records of metrics.jsonl that parse: a line cut short by a crash, or foreign text, is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                records.append(record)
    return records


def plot_losses(metrics_path, png_path):
    """Draws train and val loss and the learning rate from metrics.jsonl; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    records = read_metrics(metrics_path)
    number = lambda r, key: isinstance(r.get(key), (int, float))
    evals = [r for r in records if number(r, "val_loss") and number(r, "train_loss")]
    steps = [r for r in records if number(r, "lr")]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
    ax_loss.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["iter"] for r in steps], [r["lr"] for r in steps], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    fig.tight_layout()
    save_figure(fig, png_path)
    return True
