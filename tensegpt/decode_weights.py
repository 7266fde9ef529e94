"""
The weights as generation reads them fastest (sample.py --precision, see docs/performance.md).

A generated token multiplies one vector by every weight matrix of the model once: two FLOPs
per weight read, so the time goes into reading the weights from memory, not into the
arithmetic. Two things make that read cheaper, and training needs neither:

- layout: each matrix stored transposed, (in, out) and contiguous, so the vector-matrix
  product x @ W_t walks the weights front to back in the order memory delivers them
  (nn.Linear keeps (out, in) for training's matrix-matrix products);
- precision: fewer bytes per weight. bfloat16 halves them; int8 weight-only quantisation
  (each output row of W scaled by its largest |w| / 127) quarters them and runs through
  PyTorch's own int8 kernel, torch._weight_int8pack_mm, the one torchao's int8
  weight-only mode calls on a CPU.

for_decoding(model, precision) turns a trained GPT into such a model in place; its outputs
are those of the model (float32: the same numbers up to rounding order).
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISIONS = ("float32", "bfloat16", "int8")


class TransposedLinear(nn.Module):
    """y = x W^T + b with W stored as W^T: (in, out), contiguous."""

    def __init__(self, linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        y = x.to(self.weight_t.dtype) @ self.weight_t
        return y if self.bias is None else y + self.bias

    def untransposed(self):
        """The nn.Linear of the same weights, stored (out, in) again."""
        weight = self.weight_t.t()  # (out, in)
        linear = nn.Linear(*self.weight_t.shape, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        linear.bias = self.bias
        return linear


class Int8Linear(nn.Module):
    """y = x (scale * W_int8)^T + b: W rounded to int8 per output row, bfloat16 activations."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)  # (out,): max |w| -> 127
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)  # rounded by the scale the kernel uses
        self.weight = nn.Parameter(q.to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), False)

    def forward(self, x):
        x2 = x.to(torch.bfloat16).reshape(-1, x.size(-1))  # (N, in)
        if x2.device.type == "cpu":  # one pass: int8 weights times bfloat16 activations, then the scales
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        else:  # elsewhere the same product, the int8 weights widened on the fly (fused under torch.compile)
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale
        y = y.reshape(*x.shape[:-1], -1)  # (..., out)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def for_decoding(model, precision="float32", layout="fastest"):
    """
    The model, in place, with everything (embeddings, norms, the KV cache it makes) in
    float32 or, for bfloat16 and int8, bfloat16, and every nn.Linear in its decoding form:
    int8 weights, or for float32 and bfloat16 the layout that reads faster here. Which one
    that is depends on the CPU and the BLAS library (docs/performance.md has both measured),
    so layout='fastest' times one generated token in each and keeps the faster;
    'transposed' or 'as_is' choose. A transposed output layer is a copy of its own: the
    embedding table stays for looking up one row per token.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if layout not in ("fastest", "transposed", "as_is"):
        raise ValueError(f"layout must be fastest, transposed or as_is; got {layout!r}")
    model = model.to(torch.float32 if precision == "float32" else torch.bfloat16).eval()
    slots = [
        (module, name)
        for module in list(model.modules())
        for name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]
    if precision == "int8":
        swap(slots, Int8Linear)
    elif layout != "as_is":
        # one matrix at a time, each old one let go as its copy is made: never both layouts whole
        # (but the output layer tied to the embedding, whose weight the embedding keeps anyway)
        tied = {(id(m), n): getattr(m, n) for m, n in slots if getattr(m, n).weight is model.wte.weight}
        as_is = one_token_seconds(model) if layout == "fastest" else 0.0
        swap(slots, TransposedLinear)
        if layout == "fastest" and one_token_seconds(model) > as_is:
            for module, name in slots:
                layer = getattr(module, name)
                setattr(module, name, tied.get((id(module), name)) or layer.untransposed())
    return model


def swap(slots, make):
    """Replaces each (module, name)'s layer by make(layer), in place, one layer at a time."""
    for module, name in slots:
        setattr(module, name, make(getattr(module, name)))


def one_token_seconds(model, repeats=3):
    """The fastest of `repeats` forward passes for one new token (what each generated token costs)."""
    idx = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
    caches = model.new_caches(1)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        model(idx, caches=caches)
        if idx.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def weight_bytes_per_token(model, context=0):
    """
    The bytes one generated token reads: every matrix of the output layer and the blocks,
    every norm and bias, one row of the embeddings, and the KV cache of `context`
    positions. (The embedding table is looked up, not read whole.)
    """
    total, c = 0, model.config
    for name, p in model.named_parameters():
        looked_up = name.startswith(("wte.", "wpe.")) and p is not getattr(model.lm_head, "weight", None)
        total += (p[0] if looked_up else p).numel() * p.element_size()  # tied: the output layer reads it
    kv = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * context * model.wte.weight.element_size()
    return total + kv
