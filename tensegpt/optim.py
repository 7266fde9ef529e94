"""
The optimizers train.py steps: AdamW (weight decay on matrices only), or Muon for the
blocks' matrices beside AdamW for the rest.
"""

import math

import torch


def configure_optimizers(model, learning_rate, weight_decay, betas, kind="adamw"):
    """
    The optimizers that train model, as a list (train.py steps each one).
    'adamw': AdamW with weight decay on matrices (Linear weights, embeddings) only:
    decaying biases and norm gains just pulls them away from their useful values.
    'muon': Muon (Jordan et al. 2024) for the blocks' 2-D weight matrices: it replaces
    each matrix's momentum by the nearest orthogonal matrix (Newton-Schulz iterations),
    so every direction of the matrix learns at the same rate. The embedding, the output
    layer tied to it, biases and gains stay with AdamW, as Muon's authors advise.
    match_rms_adamw scales Muon's step so the same learning rate suits both (Liu et al. 2025).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if kind == "muon" and p.dim() == 2 and name.startswith("blocks.")]
    with_muon = {id(p) for p in hidden}
    groups = [
        {
            "params": [p for _, p in named if p.dim() >= 2 and id(p) not in with_muon],
            "weight_decay": weight_decay,
        },
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:  # fused: one kernel for all parameters, where this torch has it for the device
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)]
    except (RuntimeError, TypeError):
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)]
    if hidden:
        muon = StackedMuon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        optimizers.append(muon)
    return optimizers


class StackedMuon(torch.optim.Muon):
    """
    torch.optim.Muon's update, with the matrices of one shape orthogonalised together. The blocks' matrices come
    in a few shapes, one of each per layer, and torch.optim.Muon runs its Newton-Schulz iterations matrix by
    matrix: at this project's sizes those are small matmuls, each mostly a call's fixed cost. Stacked, the layers'
    matrices of a shape go through one batched matmul per iteration (docs/training.md: the step's Muon time
    halved on a CPU). Same settings, same state (momentum_buffer) and checkpoints as torch.optim.Muon; the
    numbers agree with it to bfloat16's rounding (tests/test_modern.py).
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            same_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    same_shape.setdefault(p.shape, []).append(p)
            for shape, params in same_shape.items():
                grads = [p.grad for p in params]
                buffers = [self.momentum_buffer(p) for p in params]
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
                if group["nesterov"]:
                    updates = torch.stack([g.lerp(b, momentum) for g, b in zip(grads, buffers, strict=True)])
                else:
                    updates = torch.stack(buffers)
                # (n, rows, cols), the n matrices of this shape
                updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                torch._foreach_mul_(params, 1 - lr * weight_decay)
                step_size = lr * scale_for(shape, group["adjust_lr_fn"])
                torch._foreach_add_(params, list(updates.to(params[0].dtype).unbind(0)), alpha=-step_size)
        return loss

    def momentum_buffer(self, p):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def orthogonalize(g, coefficients, steps, eps):
    """
    Newton-Schulz's quintic iteration on a stack of matrices (n, rows, cols), in bfloat16, as torch.optim.Muon
    computes it for one: each matrix scaled to norm 1, then X <- aX + (bA + cA^2)X with A = XX^T, on the short side.
    """
    a, b, c = coefficients
    x = g.bfloat16()
    wide = g.size(-2) <= g.size(-1)
    if not wide:
        x = x.mT  # (n, cols, rows): A is then the smaller of the two Gram matrices
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (n, short, short)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x if wide else x.mT


def scale_for(shape, adjust_lr_fn):
    """How much torch.optim.Muon scales the learning rate for a matrix of this shape."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    return 1.0
