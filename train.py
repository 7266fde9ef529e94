"""
Trains a GPT on the token files prepare.py wrote.

    python train.py config/small.py --batch_size=32
    python train.py config/small.py --init_from=resume --max_iters=3000

Settings: the defaults below, then each config file named (plain Python assignments),
then --key=value overrides (Python literals). Writes out_dir/trained.pth (the best val
loss so far), out_dir/last.pth (the latest state: Ctrl-C and resume use it) and
out_dir/metrics.jsonl, drawn as out_dir/loss.png.

Read it top to bottom: the settings, the learning-rate schedule, batches, one training
step, evaluation, then main(): set up, and the loop. What keeps a run safe and scales it
out lives beneath, in tensegpt/: the checks and the out_dir lock (run_setup.py), several
processes under torchrun, DDP and FSDP (distributed.py), the progress lines, metrics.jsonl
and loss.png (runlog.py), the checkpoint (checkpoint.py).
"""

import math
import sys
import time

import numpy as np
import torch

from tensegpt import checkpoint, distributed, lora, run_setup
from tensegpt.common import parse_config
from tensegpt.compiling import compile_now
from tensegpt.data import open_splits
from tensegpt.hardware import autocast_for, measure_peak_flops
from tensegpt.optim import configure_optimizers
from tensegpt.overfitting import Overfitting, data_budget
from tensegpt.packing import ChatBatches
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

DEFAULTS = {
    # I/O
    "data_dir": "data",  # where prepare.py wrote train.bin, val.bin, meta.json
    "out_dir": "out",  # where trained.pth (best), last.pth (latest), metrics.jsonl and loss.png go
    "init_from": "scratch",  # 'scratch', 'resume', 'hf:FOLDER', 'gpt2' (to gpt2-xl) or a .pth to fine-tune
    "overwrite": False,  # scratch into an out_dir that has a trained.pth replaces it only if True
    "eval_interval": 250,  # evaluate (and save) every this many iterations
    "early_stop": 0,  # stop after this many evaluations without a better val loss (patience); 0: run to max_iters
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
    "pos_encoding": "learned",  # 'learned' (GPT-2), 'sinusoidal' (Vaswani et al.) or 'rotary' (RoFormer)
    "activation": "gelu",  # 'gelu' (GPT-2's tanh approximation), 'relu', 'relu2' (squared ReLU) or 'swiglu'
    "norm": "layernorm",  # 'layernorm' (GPT-2) or 'rmsnorm'
    "n_kv_head": 0,  # key/value heads, a divisor of n_head (grouped-query attention); 0 means n_head
    "qk_norm": False,  # RMS-normalise each head's queries and keys before their dot product
    "attention": "sdpa",  # 'sdpa' (PyTorch's fused kernel) or 'explicit' (written out: faster compiled on a CPU)
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
    "fsdp": False,  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    # fine-tuning (docs/chat.md): init_from a checkpoint or GPT-2, fresh optimizer and schedule
    "chat": False,  # True: train on conversations (a chat data folder); the loss counts the answers
    "train_on_prompt": False,  # chat: the loss counts the prompts' tokens too
    "lora_rank": 0,  # > 0: freeze the weights, train LoRA adapters of this rank beside them
    "lora_alpha": 16.0,  # LoRA's update is scaled by lora_alpha / lora_rank
    "lora_targets": "c_attn,c_proj,c_fc,wte",  # the matrices that get adapters (wte: the tied embedding)
}
# every field of model.py's GPTConfig is a --key=value: one missing above (a fork's new one) with its default there
DEFAULTS = run_setup.with_model_keys(DEFAULTS)


# ----------------------------------------------------------------------------- learning-rate schedule


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


# ----------------------------------------------------------------------------- batches


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


def make_batches(split, config, device, seed, micro_batches=1, rank=0, world_size=1, say=None):
    """Batches of a split: random windows of text, or rows of whole conversations (--chat: say notes what is cut)."""
    B, T = config["batch_size"], config["block_size"]
    if not config["chat"]:
        return Batches(split, B, T, device, seed, micro_batches, rank, world_size)
    batches = ChatBatches(split, B, T, device, seed, micro_batches, rank, world_size, config["train_on_prompt"])
    if batches.too_long and say:
        say(f"note: {batches.too_long:,} conversations are longer than block_size + 1 tokens: left out")
    return batches


# ----------------------------------------------------------------------------- one training step


def train_step(model, optimizers, scaler, batches, lr, config, autocast):
    """One optimizer step over this process's micro-batches; returns the mean loss as a tensor (no sync)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)  # here, not after the step: the gradients stay to be measured
        for group in optimizer.param_groups:
            group["lr"] = lr
    total = 0.0
    for micro, (x, y) in enumerate(batches.step()):
        last = micro == batches.grad_accum - 1  # several processes average their gradients on the last only
        with autocast, distributed.gradient_sync(model, last):
            _, loss = model(x, y)
            loss = loss / batches.grad_accum  # the sum of the micro-batches' gradients is the mean's
        scaler.scale(loss).backward()  # scaler: float16 only (a no-op otherwise)
        total = total + loss.detach()
    if config["grad_clip"] > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    return total


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, splits, config, device, autocast):
    """
    Mean loss over eval_iters batches of each split. The same batches every time (a fixed
    seed), so successive evaluations compare the model, not the luck of the draw.
    """
    model.eval()
    losses = {}
    for split in ("train", "val"):
        batches = make_batches(splits[split], config, device, config["seed"] + 1)
        total = torch.zeros((), device=device)
        for _ in range(config["eval_iters"]):
            x, y = next(batches.step())
            # compiled blocks run uncompiled here: a second graph, for evaluation, would take longer to compile
            with autocast, torch.compiler.set_stance("force_eager"):
                total += model(x, y)[1].float()
        losses[split] = total.item() / config["eval_iters"]
    model.train()
    return losses


# ----------------------------------------------------------------------------- the run


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], doc=__doc__)
    # checks, the processes under torchrun, the device and dtype, the out_dir's lock, the log
    run = run_setup.start_run(config)
    log, device, world_size, resume = run.log, run.device, run.world_size, config["init_from"] == "resume"

    # the data, and the model to start from: new, GPT-2's weights, a checkpoint to fine-tune, or the run to resume
    splits, meta = open_splits(config["data_dir"], config["block_size"])
    tokenizer_meta = tokenizer_from_meta(meta).meta()  # all that decoding needs, for the checkpoint
    run_setup.check_data_kind(config, meta)
    start = run_setup.starting_point(config, meta, tokenizer_meta, run, DEFAULTS, get_lr)

    # the model: the GPT (gpt), with the starting weights, and LoRA adapters if asked
    gpt = distributed.build_gpt(start.gpt_config, config, device, world_size, run.dtype)
    if start.saved is not None and not resume:
        distributed.load_state(gpt, [], start.saved, config["fsdp"])
    if start.lora_settings:
        log.say(lora.describe(lora.add_adapters(gpt, start.lora_settings), start.lora_settings))
    betas = (config["beta1"], config["beta2"])
    optimizers = configure_optimizers(gpt, config["learning_rate"], config["weight_decay"], betas, config["optimizer"])
    # each process takes its share of a step's grad_accum micro-batches
    micro_batches = config["grad_accum"] // world_size
    batches = make_batches(
        splits["train"], config, device, config["seed"], micro_batches, run.rank, world_size, log.say
    )
    iter_num, best_val_loss = 0, float("inf")
    # evaluations since the best val loss: memorising is said once, and --early_stop stops the run
    overfitting = Overfitting(config["early_stop"], run.best_path)
    if resume:
        distributed.restore(start.saved, gpt, optimizers, batches.generator, device.split(":")[0], config["fsdp"])
        iter_num, best_val_loss = start.saved["iter_num"], start.saved["best_val_loss"]
        overfitting.restore(start.saved.get("overfitting"))
    for note in start.notes:
        log.say(note)
    # the whole weights: under FSDP each rank now keeps only its shard
    start.saved = None
    # what the step calls: the GPT, compiled block by block (--compile) and, under DDP, wrapped
    model = distributed.wrap(gpt, config, device, world_size, run.local_rank)

    autocast, scaler = autocast_for(device, run.dtype)
    peak = config["peak_flops"] or measure_peak_flops(device, getattr(torch, run.dtype))
    log.describe(gpt, tokenizer_meta, device, f"{run.dtype}, {gpt.config.attention} attention", world_size, peak)
    log.say(data_budget(meta["train_tokens"], gpt.num_params(), config))
    if config["compile"] and world_size == 1:
        # compiled now, so that a machine that cannot compile trains uncompiled, said in one line
        config["compile"] = compile_now(model, config, gpt.config.vocab_size, device, autocast, log.say)
    record = checkpoint.run_record(start.gpt_config, config, tokenizer_meta, meta, start.base, start.lora_settings)

    def save(paths, reason):
        # every rank: gathering FSDP's shards takes all of them
        state = distributed.training_state(gpt, optimizers, batches.generator, device.split(":")[0])
        state.update(record, iter_num=iter_num, best_val_loss=best_val_loss, overfitting=overfitting.state())
        if run.rank == 0:
            for path in paths:
                checkpoint.save(state, path)
        log.say(f"saved {' and '.join(paths)} at iteration {iter_num} ({reason})")

    # the loop: evaluate every eval_interval steps (and save), train, log every log_interval steps
    if not resume:
        log.new_log()
    should_stop = distributed.catch_ctrl_c()  # Ctrl-C: finish the step, save, exit
    step_losses = torch.zeros(config["log_interval"], device=device)  # logged without a sync per step
    start_iter, t_start, n_logged = iter_num, time.perf_counter(), 0
    t_log = t_start
    model.train()
    while True:
        at_eval = iter_num % config["eval_interval"] == 0 or iter_num == config["max_iters"]
        if at_eval and (iter_num > start_iter or iter_num == 0):
            t_eval = time.perf_counter()
            losses = evaluate(gpt, splits, config, device, autocast)  # every rank: FSDP needs all shards
            log.evaluation(iter_num, losses)
            if iter_num > start_iter:
                improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
                for line in overfitting.after(iter_num, losses, improved):
                    log.say(line)
                if improved:
                    save([run.last_path, run.best_path], "best val loss so far")
                else:
                    save([run.last_path], "latest")
            t_log += time.perf_counter() - t_eval  # ms/iter counts training steps only
        if iter_num >= config["max_iters"] or overfitting.stop():
            break

        lr = get_lr(iter_num, config)
        step_losses[n_logged] = train_step(model, optimizers, scaler, batches, lr, config, autocast)
        n_logged, iter_num = n_logged + 1, iter_num + 1
        if iter_num == start_iter + 1:
            log.memory(gpt, optimizers)
        stop = should_stop(world_size)  # the same answer on every rank
        if n_logged == config["log_interval"] or iter_num == config["max_iters"] or stop:
            mean = distributed.mean_across(step_losses, world_size)  # the global batch's loss, one sync per line
            log.progress(iter_num, mean[:n_logged].tolist(), lr, time.perf_counter() - t_log)
            t_log, n_logged = time.perf_counter(), 0
        if stop:
            save([run.last_path], "interrupted")
            log.interrupted(sys.argv[1:])
            sys.exit(130)

    log.done(best_val_loss, time.perf_counter() - t_start, run.best_path, run.last_path)
    distributed.finish(world_size)


if __name__ == "__main__":
    distributed.run(main)
