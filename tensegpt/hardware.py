"""What the device can do: its measured matmul peak (for MFU), and the dtype to train in."""

import functools
import time
from contextlib import nullcontext

import torch

from tensegpt.common import UserError


@functools.cache  # measured once per process: pick_dtype and the MFU share it
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


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what --dtype may name, in train.py and serve.py


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


def autocast_for(device, dtype):
    """The autocast context that runs the model in dtype ('float32': none), and the float16 loss scaler."""
    device_type = device.split(":")[0]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == "float16")


def flops_per_token(model):
    """Training FLOPs per token (PaLM, appendix B): 6 per weight, plus attention's 12 * L * T * C."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.block_size * c.n_embd


def estimate_mfu(model, tokens_per_sec, peak_flops):
    """Model FLOPs utilisation: the share of the hardware's peak FLOP/s that training uses."""
    return flops_per_token(model) * tokens_per_sec / peak_flops
