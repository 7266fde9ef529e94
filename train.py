"""
Trains a GPT on the token files prepare.py wrote.

    python train.py config/small.py --batch_size=32
    python train.py config/small.py --init_from=resume --max_iters=3000

Settings: the defaults below, then each config file named (plain Python assignments),
then --key=value overrides (Python literals). Writes out_dir/trained.pth (when val loss
improves, at the end, and on Ctrl-C) and out_dir/metrics.jsonl (one JSON object per log
line and per evaluation).
"""
import functools
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

import checkpoint
from common import UserError, atomic_write, check_seed, check_writable_folder, main_guard, parse_config, pick_device, pyplot, save_figure
from model import GPT, GPTConfig, check_config, configure_optimizers
from tokenizer import from_meta as tokenizer_from_meta
from tokenizer import read_meta

DEFAULTS = {
    # I/O
    "data_dir": "data",  # where prepare.py wrote train.bin, val.bin, meta.json
    "out_dir": "out",  # where trained.pth (best), last.pth (latest), metrics.jsonl and loss.png go
    "init_from": "scratch",  # 'scratch', 'resume' (continue out_dir/trained.pth) or 'hf:FOLDER' (GPT-2 weights)
    "overwrite": False,  # scratch into an out_dir that has a trained.pth replaces it only if True
    "eval_interval": 250,  # evaluate (and save) every this many iterations
    "eval_iters": 20,  # batches per split in each evaluation
    "log_interval": 25,  # a progress line every this many iterations
    # data
    "batch_size": 32,  # sequences per micro-batch
    "block_size": 128,  # context length in tokens
    "grad_accum": 1,  # micro-batches per optimizer step
    # model (see GPTConfig in model.py)
    "n_layer": 4,  # transformer blocks
    "n_head": 4,  # attention heads per block
    "n_embd": 128,  # model width
    "d_ff": 0,  # feed-forward hidden size; 0 means 4 * n_embd
    "dropout": 0.0,  # on embeddings, attention weights and residual branches
    "bias": False,  # biases in Linear layers and LayerNorms (GPT-2: True)
    "pos_encoding": "learned",  # 'learned' (GPT-2), 'sinusoidal' (Attention Is All You Need) or 'rotary' (RoFormer)
    "activation": "gelu",  # 'gelu' (GPT-2's tanh approximation), 'relu', 'relu2' (squared ReLU) or 'swiglu'
    "norm": "layernorm",  # 'layernorm' (GPT-2) or 'rmsnorm'
    "n_kv_head": 0,  # key/value heads, a divisor of n_head (grouped-query attention); 0 means n_head
    "qk_norm": False,  # RMS-normalise each head's queries and keys before their dot product
    # optimizer: linear warmup, then cosine decay to min_lr
    "optimizer": "adamw",  # 'adamw', or 'muon' (Muon for the blocks' matrices, AdamW for the rest)
    "learning_rate": 1e-3,  # peak learning rate
    "min_lr": 1e-4,  # the floor of the cosine decay
    "max_iters": 2000,  # total optimizer steps
    "warmup_iters": 100,  # linear warmup steps
    "lr_decay_iters": 0,  # 0 means max_iters
    "weight_decay": 0.1,  # AdamW's, on matrices only
    "beta1": 0.9,  # AdamW's first-moment decay
    "beta2": 0.99,  # AdamW's second-moment decay
    "grad_clip": 1.0,  # 0 disables clipping
    # system
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    "dtype": "auto",  # 'auto', 'float32', 'bfloat16', 'float16'
    "seed": 1337,  # model initialisation, dropout and data order (0 to 2**32 - 1)
    "peak_flops": 0.0,  # FLOP/s that MFU is measured against; 0 measures torch.mm at start
    "compile": False,  # torch.compile the model (pays off on GPUs; see the README for CPU)
    "grad_checkpointing": False,  # recompute each block's activations in backward: less memory, more time
    "fsdp": False,  # under torchrun: shard weights, gradients and optimizer state across the processes (FSDP2)
}
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]


def get_lr(it, config):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = config["lr_decay_iters"] or config["max_iters"]
    if it < config["warmup_iters"]:
        return config["learning_rate"] * (it + 1) / (config["warmup_iters"] + 1)
    if it >= decay_iters:
        return config["min_lr"]
    progress = (it - config["warmup_iters"]) / max(1, decay_iters - config["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return config["min_lr"] + coeff * (config["learning_rate"] - config["min_lr"])


def check_train_config(config):
    for key in ("batch_size", "block_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
        if config[key] <= 0:
            raise UserError(f"config key {key} must be positive, got {config[key]}")
    for key in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
        if config[key] < 0:
            raise UserError(f"config key {key} must not be negative, got {config[key]}")
    if config["init_from"] not in ("scratch", "resume") and not config["init_from"].startswith("hf:"):
        raise UserError(f"init_from must be 'scratch', 'resume' or 'hf:FOLDER', got {config['init_from']!r}")
    if config["optimizer"] not in ("adamw", "muon"):
        raise UserError(f"optimizer must be 'adamw' or 'muon', got {config['optimizer']!r}")
    if config["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {config['dtype']!r}")
    check_seed(config)
    if not config["data_dir"]:
        raise UserError("--data_dir is empty: pass the folder prepare.py wrote, --data_dir=DIR")
    check_writable_folder(config["out_dir"], "out_dir")


def lock_out_dir(out_dir):
    """
    Holds an OS lock on out_dir/.lock until this process ends, so a second train.py into
    the same folder refuses at once instead of interleaving checkpoints and logs. The OS
    drops the lock when a process dies, however it dies: a stale lock never blocks.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run one train.py per out_dir
        return None
    path = os.path.join(out_dir, ".lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise UserError(f"another train.py (process {holder}) is training into {out_dir}/ right now: "
                        f"wait for it to finish, or pass another --out_dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle  # the lock lives as long as this file object


def load_data(config):
    data_dir = config["data_dir"]
    meta_path = os.path.join(data_dir, "meta.json")
    meta = read_meta(data_dir)
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        n = os.path.getsize(path) // 2 if os.path.isfile(path) else -1
        if n != meta[f"{split}_tokens"]:
            raise UserError(f"{path} does not match {meta_path} ({n} tokens, meta.json says {meta[f'{split}_tokens']}): run python prepare.py again")
        if n < config["block_size"] + 1:
            fit = max(1, n - 1)
            raise UserError(
                f"the {split} split has {n} tokens, fewer than block_size + 1 = {config['block_size'] + 1}: "
                f"use --block_size={fit} or less"
                + (", or prepare with a larger --val_fraction" if split == "val" else ", or prepare more text")
            )
        splits[split] = np.memmap(path, dtype=np.uint16, mode="r")
        # an id past the vocabulary would crash in the embedding, or train the padding rows silently
        largest = int(splits[split].max())
        if largest >= meta["vocab_size"]:
            raise UserError(f"{path} holds token id {largest}, but {meta_path} says the vocabulary has {meta['vocab_size']} ids: "
                            f"the files do not belong together; run python prepare.py again")
    return splits, meta


class Batches:
    """
    Random (x, y) windows of one split, a training step's worth at a time. Its own RNG,
    so the data order is part of a checkpoint. Under DDP every rank draws the same
    starts for the whole global batch and takes its own share of them: the ranks see
    different windows, and N ranks see exactly what one process with N times the
    gradient accumulation would.
    """

    def __init__(self, data, batch_size, block_size, device, seed, grad_accum=1, rank=0, world_size=1):
        self.data, self.B, self.T, self.device = data, batch_size, block_size, device
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)  # (T+1,)
        # batches are written into the same buffers every step, never re-allocated
        self.x = torch.empty((batch_size, block_size), dtype=torch.int64)
        self.y = torch.empty((batch_size, block_size), dtype=torch.int64)
        self.copied = None
        if device.startswith("cuda"):  # pinned memory lets the copy to the GPU overlap compute
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
            self.copied = torch.cuda.Event()

    def step(self):
        """Yields this rank's grad_accum micro-batches (x, y) of one optimizer step, each (B, T)."""
        n = self.grad_accum * self.world_size
        starts = torch.randint(len(self.data) - self.T, (n, self.B), generator=self.generator).numpy()
        for row in starts[self.rank * self.grad_accum : (self.rank + 1) * self.grad_accum]:
            yield self.load(row)

    def load(self, starts):
        windows = self.data[starts[:, None] + self.offsets]  # (B, T+1) uint16, one gather
        if self.copied is not None:
            self.copied.synchronize()  # the last copy out of these buffers has finished
        # targets are the inputs shifted by one: each position predicts the next token
        np.copyto(self.x.numpy(), windows[:, :-1], casting="unsafe")
        np.copyto(self.y.numpy(), windows[:, 1:], casting="unsafe")
        x, y = self.x.to(self.device, non_blocking=True), self.y.to(self.device, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return x, y


@torch.no_grad()
def total_nats(model, tokens, block_size, batch_size=8, autocast=nullcontext()):
    """
    (-sum of log p(token | the tokens before it), how many tokens) over a whole split:
    windows of block_size that overlap by half, so every token after the first is scored
    exactly once with at least block_size / 2 tokens of context (all it has, near the
    start). Divided by the split's UTF-8 bytes and ln 2 this is bits per byte, which
    compares models whatever their tokenizer.
    """
    was_training = model.training
    model.eval()  # dropout off, and the logits are made (the chunked training loss makes none)
    device = model.wte.weight.device
    n = len(tokens) - 1  # targets are tokens[1:]
    T = min(block_size, n)
    starts = list(range(0, n - T + 1, max(1, T // 2)))
    if starts[-1] != n - T:
        starts.append(n - T)
    total, counted, done = 0.0, 0, 0  # done: targets scored so far are tokens[1 : done + 1]
    for i in range(0, len(starts), batch_size):
        batch = starts[i : i + batch_size]
        windows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in batch])).to(device)
        x, y = windows[:, :-1], windows[:, 1:].contiguous()
        with autocast:
            logits, _ = model(x, y)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(2, y[..., None])[..., 0]  # (B, T)
        for row, s in enumerate(batch):
            new = logprobs[row, done - s :] if done > s else logprobs[row]  # only targets not scored yet
            total -= new.sum().item()
            counted += new.numel()
            done = s + T
    model.train(was_training)
    return total, counted


def train_step(model, optimizers, scaler, batches, lr, config, autocast):
    """One optimizer step over this rank's micro-batches; returns the mean loss as a tensor (no sync)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)  # here, not after the step: the gradients stay to be measured
        for group in optimizer.param_groups:
            group["lr"] = lr
    total = 0.0
    for micro, (x, y) in enumerate(batches.step()):
        # DDP and FSDP average gradients across ranks in backward; only the last micro-step needs it
        sync = micro == batches.grad_accum - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP
            model.set_requires_gradient_sync(sync)
        with autocast, (model.no_sync() if hasattr(model, "no_sync") and not sync else nullcontext()):
            _, loss = model(x, y)
            loss = loss / batches.grad_accum  # the sum of the micro-batches' gradients is the mean's
        scaler.scale(loss).backward()
        total = total + loss.detach()
    if config["grad_clip"] > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
        # under FSDP the norm is a DTensor summed over every rank's shard: all ranks take part
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    return total


@functools.lru_cache(maxsize=None)  # measured once per process: pick_dtype and the MFU share it
def measure_peak_flops(device, dtype, seconds=0.3):
    """
    Practical matmul peak of this device: FLOP/s of torch.mm at a size that saturates it,
    the best of six short trials, so that another process busy for a moment does not
    pass for a slow machine.
    """
    n = 2048 if device != "cpu" else 1024
    # its own generator: drawing from the global one would shift the dropout masks of a resumed run
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = 0.0
    for _ in range(6):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 6 or runs == 0:
            torch.mm(a, b)
            runs += 1
        sync()
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - start))
    return best


def pick_dtype(name, device):
    """
    The dtype to train in. 'auto': bfloat16 on GPUs that have it; on a CPU, bfloat16 only
    where its matmuls measure more than twice as fast as float32 (CPUs with AVX512-BF16
    or AMX; most others run bfloat16 far slower, and autocast's casts cost something).
    """
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        if device == "cpu":
            ratio = measure_peak_flops(device, torch.bfloat16) / measure_peak_flops(device, torch.float32)
            return "bfloat16" if ratio > 2 else "float32"
        return "float32"
    if name == "float16" and not device.startswith("cuda"):
        raise UserError(f"--dtype=float16 needs a CUDA GPU (device is {device}); use --dtype=bfloat16 or float32")
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype=float16 or float32")
    return name


def read_metrics(path):
    """The records of metrics.jsonl that parse: a line cut short by a crash, or text from elsewhere, is skipped."""
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
    """train and val loss at each evaluation, and the learning rate, from metrics.jsonl; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    records = read_metrics(metrics_path)
    number = lambda r, key: isinstance(r.get(key), (int, float))  # noqa: E731
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


def load_gpt2_weights(folder, config, tokenizer_meta, say=print):
    """A GPT with the weights of a Hugging Face GPT-2 folder, cut to config's block_size, for fine-tuning."""
    from hf import load_hf

    if tokenizer_meta["tokenizer"] != "gpt2":
        raise UserError(f"GPT-2 weights need data in GPT-2's own ids, but {config['data_dir']}/ is {tokenizer_meta['tokenizer']}: "
                        f"prepare it with --full_vocab=True")
    # the architecture is the checkpoint's; the context can shrink (fewer learned positions)
    model = load_hf(folder, block_size=config["block_size"], dropout=config["dropout"])
    c = model.config
    say(f"initialising from the GPT-2 weights in {folder} (n_layer {c.n_layer}, n_head {c.n_head}, "
        f"n_embd {c.n_embd}; the model keys of the config are not used)")
    return model


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def setup_distributed(config):
    """
    (rank, local_rank, world_size, device). Under torchrun (which sets RANK, LOCAL_RANK and
    WORLD_SIZE) this joins the process group: NCCL between GPUs, gloo between CPU processes.
    """
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(config["device"])
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if config["grad_accum"] % world_size:
        raise UserError(f"grad_accum ({config['grad_accum']}) must be a multiple of the number of processes ({world_size}): "
                        f"the micro-batches of a step are shared out among them; try --grad_accum={world_size * max(1, config['grad_accum'] // world_size)}")
    device = config["device"]
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


def build_model(gpt_config, config, device, world_size, local_rank, dtype):
    """
    (model to train, raw_model: the GPT itself). One process: the GPT. DDP: every process
    holds the whole model and gradients are averaged in backward. FSDP (Zhao et al. 2023,
    PyTorch's fully_shard): each Block, then the rest (the tied embedding and output layer),
    is split across the processes, which gather a unit's weights just before using them;
    the model is built on the meta device (shapes, no memory) and each process fills only
    its own shard, so none ever holds the whole model.
    """
    if not config["fsdp"]:
        raw_model = GPT(gpt_config).to(device)
        raw_model.grad_checkpointing = config["grad_checkpointing"]
        model = torch.compile(raw_model) if config["compile"] else raw_model
        if world_size > 1:
            model = DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
        return model, raw_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = GPT(gpt_config)
    model.grad_checkpointing = config["grad_checkpointing"]
    mesh = init_device_mesh(device.split(":")[0], (world_size,))
    # bfloat16: weights gathered and used in bfloat16, gradients averaged in float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in model.blocks:
        if config["compile"]:
            block.compile()  # per block, before sharding (as torchtitan does)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    model.init_weights()
    return model, model


def load_state(raw_model, optimizers, state, fsdp):
    """
    Weights (and optimizer state, if given) from whole tensors: a checkpoint or GPT-2's
    weights. Under FSDP rank 0's copy is sent out and each rank keeps its shard.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp)
    set_model_state_dict(raw_model, state["model"], options=options)
    if "optimizer" in state:
        set_optimizer_state_dict(raw_model, optimizers, checkpoint.optimizer_state_by_name(state["optimizer"], raw_model), options=options)


def training_state(raw_model, optimizers, batches, device_type):
    """
    Weights, optimizer state and RNG states as whole tensors on the CPU, the same whatever
    the layout (gathered from the shards under FSDP, so every rank must call this).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(raw_model, options=options),
        "optimizer": get_optimizer_state_dict(raw_model, optimizers, options=options),
        "rng": {"batches": batches.generator.get_state(), "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})},
    }


def restore(saved, raw_model, optimizers, batches, device_type, fsdp):
    """Puts a run back exactly where the saved checkpoint left it: weights, optimizer, data order, dropout's RNG."""
    load_state(raw_model, optimizers, saved, fsdp)
    batches.generator.set_state(saved["rng"]["batches"])
    torch.set_rng_state(saved["rng"]["torch"])
    if device_type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"])


def state_megabytes(raw_model, optimizers):
    """This process's share of weights, gradients and optimizer state, in MB (a shard's under FSDP)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - a DTensor's own part
    size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts) / 1e6  # noqa: E731
    params = list(raw_model.parameters())
    states = [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return size(params), size(p.grad for p in params if p.grad is not None), size(states)


def schedule_note(saved, config):
    """A line about the learning rate when a resume changes where the schedule ends, else None."""
    before = {**config, **{k: saved["train_config"][k] for k in ("max_iters", "lr_decay_iters", "warmup_iters",
                                                                    "learning_rate", "min_lr") if k in saved.get("train_config", {})}}
    end = lambda c: c["lr_decay_iters"] or c["max_iters"]  # noqa: E731
    it = saved["iter_num"]
    if end(before) == end(config) and get_lr(it, before) == get_lr(it, config):
        return None
    return (f"note: the learning-rate schedule now decays until iteration {end(config)} (it was {end(before)}): at iteration {it} "
            f"the rate goes from {get_lr(it, before):.2e} to {get_lr(it, config):.2e}, so the loss may rise for a while before "
            f"it falls again. To keep the old schedule, pass --lr_decay_iters={end(before)} (the rate then stays at min_lr)")


@torch.no_grad()
def evaluate(model, splits, config, device, autocast):
    """Mean loss over eval_iters batches of each split. The same batches every time
    (a fixed seed), so successive evaluations compare the model, not the luck of the draw."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        batches = Batches(splits[split], config["batch_size"], config["block_size"], device, config["seed"] + 1)
        total = torch.zeros((), device=device)
        for _ in range(config["eval_iters"]):
            x, y = next(batches.step())
            with autocast:
                total += model(x, y)[1].float()
        losses[split] = total.item() / config["eval_iters"]
    model.train()
    return losses


def append_metrics(path, record):
    """One JSON line; a log, never a reason to stop: a failed write is a warning."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        print(f"warning: could not append to {path} ({e.strerror}); training goes on", file=sys.stderr)


def log_evaluation(out_dir, iter_num, losses):
    """An evaluation's line in metrics.jsonl, and loss.png drawn again."""
    append_metrics(os.path.join(out_dir, "metrics.jsonl"), {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                                           "val_ppl": math.exp(losses["val"])})
    redraw_loss_curve(out_dir)


def redraw_loss_curve(out_dir):
    try:
        plot_losses(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
    except Exception as e:  # noqa: BLE001 - a picture must never stop training
        print(f"warning: could not draw {out_dir}/loss.png ({str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__}); "
              f"training goes on", file=sys.stderr)


def refuse_overwrite(config, paths):
    existing = [p for p in paths if os.path.exists(p)]
    if config["init_from"] != "resume" and existing and not config["overwrite"]:
        args = " ".join(a for a in sys.argv[1:] if not a.startswith("--overwrite"))
        raise UserError(f"{existing[0]} already exists: to start over, run python train.py {args} --overwrite=True; "
                        f"to continue it, --init_from=resume; or pass another --out_dir")


def gpt_config_for(config, vocab_size):
    """The GPTConfig of a train.py config's model keys, for a vocabulary of vocab_size ids."""
    # the embedding and output layer get a multiple of 64 rows: faster matmuls; the
    # padding rows are never a target and decode to nothing
    return GPTConfig(vocab_size=-(-vocab_size // 64) * 64, **{k: config[k] for k in MODEL_KEYS})


def choose_model(config, meta, tokenizer_meta, say):
    """(GPTConfig, whole initial weights or None): the config's model keys, or GPT-2's (init_from=hf:FOLDER)."""
    if config["init_from"].startswith("hf:"):
        model = load_gpt2_weights(config["init_from"][3:], config, tokenizer_meta, say)
        return model.config, {"model": model.state_dict()}
    gpt_config = gpt_config_for(config, meta["vocab_size"])
    problems = check_config(gpt_config)
    if problems:
        raise UserError("; ".join(problems))
    return gpt_config, None


def check_layout(config, world_size, dtype):
    """The combinations of --fsdp, --optimizer and dtype that cannot work, refused before any work."""
    if config["optimizer"] == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer=muon needs torch.optim.Muon (torch 2.9 or later; this is {torch.__version__}): "
                        f"upgrade torch, or use --optimizer=adamw")
    if not config["fsdp"]:
        return
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 9):  # 2.6 crashes on CPU; 2.7 and 2.8 sum the ranks' gradients instead of averaging them
        raise UserError(f"--fsdp=True needs torch 2.9 or later (this is {torch.__version__}); upgrade torch, or train with DDP")
    if world_size == 1:
        raise UserError("--fsdp=True shards the model across the processes torchrun starts: "
                        "run torchrun --nproc_per_node=N train.py ... (one process has nothing to share with)")
    if config["optimizer"] == "muon":
        raise UserError("--optimizer=muon orthogonalises whole matrices, which FSDP splits across processes: use --fsdp=False or --optimizer=adamw")
    if dtype == "float16":
        raise UserError("--fsdp=True trains in float32 or bfloat16 (float16 would need a sharded loss scaler): use --dtype=bfloat16")


def describe_run(raw_model, tokenizer_meta, config, device, dtype, world_size, batches, peak):
    layout = "FSDP" if config["fsdp"] else "DDP" if world_size > 1 else "one process"
    return (f"model: {raw_model.num_params() / 1e6:.2f}M parameters, vocab {raw_model.config.vocab_size} ({tokenizer_meta['tokenizer']}); "
            f"device {device}, {dtype}{', compiled' if config['compile'] else ''}, {layout}; global batch "
            f"{config['batch_size'] * config['block_size'] * config['grad_accum']:,} tokens per iteration ({world_size} process(es) x "
            f"{batches.grad_accum} micro-batch(es) x {config['batch_size']} x {config['block_size']}); matmul peak {peak / 1e9:.0f} GFLOP/s")


def catch_ctrl_c():
    """
    A flag that Ctrl-C raises: the loop finishes its iteration, saves and exits. A second
    Ctrl-C kills at once, which is safe too: checkpoints are only ever replaced by an atomic rename.
    Under torchrun every Ctrl-C reaches a rank twice (from the terminal, and forwarded by
    torchrun), so a rank keeps the flag; torchrun kills one still running 30 s later.
    """
    interrupted = torch.zeros((), dtype=torch.int32)

    def on_sigint(signum, frame):
        interrupted.fill_(1)
        if "RANK" not in os.environ:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, on_sigint)
    return interrupted


def log_progress(step_losses, n_logged, iter_num, lr, seconds, config, raw_model, peak, world_size, metrics_path, master, say):
    """One progress line and metrics record for the last n_logged steps; stops the run on a NaN or infinite loss."""
    if world_size > 1:  # the global batch's loss: the mean over ranks
        dist.all_reduce(step_losses, op=dist.ReduceOp.SUM)
        step_losses /= world_size
    losses = step_losses[:n_logged].tolist()  # the one sync per log line
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise UserError(f"loss became {losses[bad[0]]} at iteration {iter_num - n_logged + bad[0] + 1}; stopped without saving, "
                        f"{config['out_dir']}/last.pth keeps the last good state; try a lower --learning_rate (now {config['learning_rate']})")
    dt = seconds / n_logged
    tokens_per_sec = config["batch_size"] * config["block_size"] * config["grad_accum"] / dt
    mfu = raw_model.estimate_mfu(tokens_per_sec, peak * world_size)
    eta = dt * (config["max_iters"] - iter_num)  # at the pace of the last log_interval iterations
    say(f"iter {iter_num}/{config['max_iters']} ({100 * iter_num / config['max_iters']:.0f}%) | loss {losses[-1]:.4f} | "
        f"lr {lr:.2e} | {1000 * dt:.1f} ms/iter, {1 / dt:.1f} it/s | {tokens_per_sec:,.0f} tok/s | MFU {100 * mfu:.1f}% | "
        f"ETA {format_seconds(eta)}", flush=True)
    if master:
        append_metrics(metrics_path, {"iter": iter_num, "loss": losses[-1], "losses": losses, "lr": lr,
                                      "ms_per_iter": 1000 * dt, "tokens_per_sec": tokens_per_sec, "mfu": mfu})


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], doc=__doc__)
    check_train_config(config)
    out_dir, resume = config["out_dir"], config["init_from"] == "resume"
    best_path, last_path = os.path.join(out_dir, "trained.pth"), os.path.join(out_dir, "last.pth")
    refuse_overwrite(config, [best_path, last_path])
    rank, local_rank, world_size, device = setup_distributed(config)
    master = rank == 0  # only rank 0 prints and writes files
    say = print if master else (lambda *args, **kwargs: None)
    lock = lock_out_dir(out_dir) if master else None  # noqa: F841 - held until the process ends
    dtype = pick_dtype(config["dtype"], device)
    check_layout(config, world_size, dtype)
    device_type = device.split(":")[0]
    torch.manual_seed(config["seed"] + rank)  # dropout masks differ between ranks; rank 0's weights are everyone's

    splits, meta = load_data(config)
    tokenizer_meta = tokenizer_from_meta(meta).meta()  # just what decoding needs, for the checkpoint
    gpt_config, initial = choose_model(config, meta, tokenizer_meta, say)
    resume_path = last_path if os.path.exists(last_path) else best_path
    if resume:
        initial = checkpoint.load(resume_path, missing_hint=(
            "nothing to resume; leave out --init_from=resume to start a new run, or pass the --out_dir of the run to continue"))
        checkpoint.check_resumable(initial, resume_path, asdict(gpt_config), tokenizer_meta, meta, config)

    model, raw_model = build_model(gpt_config, config, device, world_size, local_rank, dtype)
    optimizers = configure_optimizers(raw_model, config["learning_rate"], config["weight_decay"], (config["beta1"], config["beta2"]),
                                      config["optimizer"])
    batches = Batches(splits["train"], config["batch_size"], config["block_size"], device, config["seed"],
                      config["grad_accum"] // world_size, rank, world_size)
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        restore(initial, raw_model, optimizers, batches, device_type, config["fsdp"])
        iter_num, best_val_loss = initial["iter_num"], initial["best_val_loss"]
        say(f"resuming {resume_path} at iteration {iter_num} (best val loss {best_val_loss:.4f})")
        note = schedule_note(initial, config)  # a changed schedule gets a line
        if note:
            say(note)
    elif initial is not None:
        load_state(raw_model, optimizers, initial, config["fsdp"])
    del initial  # the whole weights: under FSDP each rank now keeps only its shard

    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    peak = config["peak_flops"] or measure_peak_flops(device, getattr(torch, dtype))
    say(describe_run(raw_model, tokenizer_meta, config, device, dtype, world_size, batches, peak))
    about = {"model_config": asdict(gpt_config), "train_config": config, "tokenizer_meta": tokenizer_meta, "data": checkpoint.data_record(meta)}

    def save(paths, reason):  # every rank: gathering FSDP's shards takes all of them
        state = {**about, **training_state(raw_model, optimizers, batches, device_type), "iter_num": iter_num, "best_val_loss": best_val_loss}
        if master:
            for path in paths:
                checkpoint.save(state, path)
        say(f"saved {' and '.join(paths)} at iteration {iter_num} ({reason})")

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master and not resume:
        atomic_write(metrics_path, lambda f: None)  # a new run starts a new log
    interrupted = catch_ctrl_c()
    step_losses = torch.zeros(config["log_interval"], device=device)  # logged without a sync per step
    start_iter, t_start, n_logged = iter_num, time.perf_counter(), 0
    t_log = t_start
    model.train()
    while True:
        if (iter_num % config["eval_interval"] == 0 or iter_num == config["max_iters"]) and (iter_num > start_iter or iter_num == 0):
            t_eval = time.perf_counter()
            losses = evaluate(raw_model, splits, config, device, autocast)  # every rank: under FSDP each holds a shard
            say(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val perplexity {math.exp(losses['val']):.2f}")
            if iter_num > start_iter:  # save first: the log and the picture are extras
                improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
                save([last_path, best_path] if improved else [last_path], "best val loss so far" if improved else "latest")
            if master:
                log_evaluation(out_dir, iter_num, losses)
            t_log += time.perf_counter() - t_eval  # ms/iter counts training steps only
        if iter_num >= config["max_iters"]:
            break
        lr = get_lr(iter_num, config)
        step_losses[n_logged] = train_step(model, optimizers, scaler, batches, lr, config, autocast)
        n_logged, iter_num = n_logged + 1, iter_num + 1
        if iter_num == start_iter + 1:
            say("memory per process: weights {:.1f} MB, gradients {:.1f} MB, optimizer state {:.1f} MB".format(*state_megabytes(raw_model, optimizers)))
        # a copy: Ctrl-C may set the flag again between the all-reduce and the checks, and
        # every rank must decide on the same value or they part ways mid-collective
        stop = interrupted.clone()
        if world_size > 1:  # every rank stops at the same step when one of them got Ctrl-C
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        stop = bool(stop)
        if n_logged == config["log_interval"] or iter_num == config["max_iters"] or stop:
            log_progress(step_losses, n_logged, iter_num, lr, time.perf_counter() - t_log, config, raw_model, peak, world_size,
                         metrics_path, master, say)
            t_log, n_logged = time.perf_counter(), 0
        if stop:
            save([last_path], "interrupted")
            args = [a for a in sys.argv[1:] if not a.startswith(("--init_from", "--overwrite"))]
            say(f"interrupted: continue with python train.py {' '.join(args + ['--init_from=resume'])}", file=sys.stderr)
            sys.exit(130)

    say(f"done: best val loss {best_val_loss:.4f}, {format_seconds(time.perf_counter() - t_start)}; "
        f"{best_path} is the best model, {last_path} the latest state")
    say(f"sample from it: python sample.py{'' if best_path == os.path.join('out', 'trained.pth') else ' --ckpt=' + best_path}")
    if world_size > 1:
        dist.barrier()  # leave together: a rank that quits early can abort the others' gloo threads


def leave_process_group(code):
    """
    Ends a torchrun process: leaves the process group, then exits at once (os._exit)
    instead of through Python's shutdown. Why: a gloo worker thread drops its references
    to a finished collective's tensors a moment after the collective completes; if that
    moment falls in the interpreter's shutdown, the thread cannot take the GIL and the
    process aborts ("terminate called without an active exception", exit code 1 from
    torchrun) after a run that succeeded and saved. Every file is closed by now. After a
    failure the group is not destroyed: another rank may be inside a collective, which
    destroying would wait on forever.
    """
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if "RANK" not in os.environ:
        main_guard(main)
    else:
        try:
            main_guard(main)
            code = 0
        except SystemExit as e:  # a UserError (1), Ctrl-C (130)
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        leave_process_group(code)
