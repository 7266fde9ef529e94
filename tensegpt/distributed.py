"""
Everything in training that depends on the layout, so that train.py reads as one process:

    one process   the GPT itself
    DDP           torchrun starts N processes; each holds the whole model, and gradients
                  are averaged across them in backward
    FSDP (--fsdp) each Block, then the rest (the tied embedding and output layer), is split
                  across the processes (Zhao et al. 2023, PyTorch's fully_shard), which
                  gather a unit's weights just before using them

Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) the processes join a process
group: NCCL between GPUs, gloo between CPU processes. Checkpoints hold whole tensors in
every layout (torch.distributed.checkpoint's state dicts, optimizer state keyed by
parameter name), so a run saved in one layout resumes in any other.
"""

import os
import signal
import sys
import traceback
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from model import GPT
from tensegpt import checkpoint
from tensegpt.common import UserError, main_guard, pick_device


def setup(config):
    """(rank, local_rank, world_size, device); under torchrun this joins the process group."""
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(config["device"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if config["grad_accum"] % world_size:
        fit = world_size * max(1, config["grad_accum"] // world_size)
        raise UserError(
            f"grad_accum ({config['grad_accum']}) must be a multiple of the number of processes ({world_size}): "
            f"the micro-batches of a step are shared out among them; try --grad_accum={fit}"
        )
    device = config["device"]
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


def build_gpt(gpt_config, config, device, world_size, dtype):
    """The GPT to train: on the device, or under FSDP sharded across the processes."""
    if config["fsdp"]:
        return shard(gpt_config, config, device, world_size, dtype)
    gpt = GPT(gpt_config).to(device)
    gpt.grad_checkpointing = config["grad_checkpointing"]
    return gpt


def wrap(gpt, config, device, world_size, local_rank):
    """
    What the training step calls: the GPT, its blocks compiled (--compile) and, under DDP, wrapped so that
    backward averages the gradients. All of it from outside: the GPT itself is not changed.
    """
    if config["fsdp"]:
        return gpt  # sharded already; its blocks were compiled before sharding
    if config["compile"]:
        compile_regions(gpt)
    if world_size > 1:
        return DistributedDataParallel(gpt, device_ids=[local_rank] if device.startswith("cuda") else None)
    return gpt


def compile_regions(gpt, **options):
    """
    torch.compile (options: its keywords) for training, region by region: each block on its own (regional
    compilation, as torchtitan does: the blocks are alike, so one compiled graph serves them all, in about half the
    time of compiling the whole model; docs/training.md measures it). nn.Module.compile wraps a module from outside;
    compiling.compile_now undoes it where compiling fails.
    """
    for block in gpt.blocks:
        block.compile(**options)


def shard(gpt_config, config, device, world_size, dtype):
    """
    A GPT sharded by FSDP2. Every process builds the same whole GPT (seeded alike: its modules' constructors
    initialise it, a fork's own initialisation included), and FSDP keeps each process's part of every tensor: the
    numbers are exactly those of one process. The whole model is held once per process while it is built.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the same weights on every rank: the global RNG is seeded with seed + rank (dropout), so build from seed alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        gpt = GPT(gpt_config)
    gpt = gpt.to(device)
    gpt.grad_checkpointing = config["grad_checkpointing"]
    mesh = init_device_mesh(device.split(":")[0], (world_size,))
    # bfloat16: weights gathered and used in bfloat16, gradients averaged in float32
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = bf16 if dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in gpt.blocks:
        if config["compile"]:
            block.compile()  # per block, before sharding (as torchtitan does)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(gpt, mesh=mesh, mp_policy=policy)
    return gpt


def gradient_sync(model, sync):
    """
    A context for one micro-step's backward: DDP and FSDP average the gradients across the
    processes only when sync (the last micro-step of an optimizer step); one process: nothing.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(sync)
    return model.no_sync() if hasattr(model, "no_sync") and not sync else nullcontext()


def mean_across(tensor, world_size):
    """The tensor averaged over the processes (all of them must call this); itself with one."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size
    return tensor


def catch_ctrl_c():
    """
    Returns should_stop(world_size): True at the same step on every process once Ctrl-C was
    pressed, so the loop finishes its iteration, saves and exits. A second Ctrl-C kills at
    once, which is safe too: checkpoints are only ever replaced by an atomic rename. Under
    torchrun every Ctrl-C reaches a rank twice (from the terminal, and forwarded by torchrun),
    so a rank keeps the flag; torchrun kills one still running 30 s later.
    """
    interrupted = torch.zeros((), dtype=torch.int32)

    def on_sigint(signum, frame):
        interrupted.fill_(1)
        if "RANK" not in os.environ:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, on_sigint)

    def should_stop(world_size):
        # a copy: Ctrl-C may set the flag again between the all-reduce and the checks, and
        # every rank must decide on the same value or they part ways mid-collective
        stop = interrupted.clone()
        if world_size > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop)

    return should_stop


def load_state(gpt, optimizers, state, fsdp):
    """
    Weights (and optimizer state, if given) from whole tensors: a checkpoint or GPT-2's
    weights. Under FSDP rank 0's copy is sent out and each rank keeps its shard.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp)
    set_model_state_dict(gpt, state["model"], options=options)
    if "optimizer" in state:
        by_name = checkpoint.optimizer_state_by_name(state["optimizer"], gpt)
        set_optimizer_state_dict(gpt, optimizers, by_name, options=options)


def training_state(gpt, optimizers, data_generator, device_type):
    """
    Weights, optimizer state and RNG states as whole tensors on the CPU, the same whatever
    the layout (gathered from the shards under FSDP, so every rank must call this).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rng = {"batches": data_generator.get_state(), "torch": torch.get_rng_state()}
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return {
        "model": get_model_state_dict(gpt, options=options),
        "optimizer": get_optimizer_state_dict(gpt, optimizers, options=options),
        "rng": rng,
    }


def restore(saved, gpt, optimizers, data_generator, device_type, fsdp):
    """Puts a run back exactly where the checkpoint left it: weights, optimizer, data order, dropout's RNG."""
    load_state(gpt, optimizers, saved, fsdp)
    data_generator.set_state(saved["rng"]["batches"])
    torch.set_rng_state(saved["rng"]["torch"])
    if device_type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"])


def finish(world_size):
    if world_size > 1:
        dist.barrier()  # leave together: a rank that quits early can abort the others' gloo threads


def run(main):
    """Runs a script's main(): one-line errors (main_guard), and under torchrun a clean exit."""
    if "RANK" not in os.environ:
        main_guard(main)
        return
    try:
        main_guard(main)
        code = 0
    except SystemExit as e:  # a UserError (1), Ctrl-C (130)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    leave_process_group(code)


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
