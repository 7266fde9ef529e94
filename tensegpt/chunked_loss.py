"""
The output layer and the loss in chunks of rows, for training with a large vocabulary:
model.py's forward makes the whole (B, T, V) logits, which at GPT-2's 50,304 tokens can
be hundreds of MB a step. train.py trains through ChunkedLoss where that pays
(use_chunked_loss); evaluation and generation use the model's own forward.
"""

import torch
import torch.nn as nn

from tensegpt.chat import IGNORE  # a target the loss leaves out

CHUNK_ELEMENTS = 3 << 20  # logits per chunk: 12 MB in float32, about what stays in a CPU's cache
PLAIN_LOGITS_MAX_BYTES = 256 << 20  # up to this size of (rows, V) float32 logits, the plain loss


def use_chunked_loss(vocab_size, rows):
    """
    Whether training computes the loss in chunks, for `rows` targets a micro-step: only
    where the (rows, V) logits would pass PLAIN_LOGITS_MAX_BYTES. There, holding them,
    their softmax and their gradient is what costs (config/small.py with GPT-2's vocabulary:
    824 MB of logits, 1.4x faster in chunks); below it the plain loss is never slower
    than itself, while the chunks' many small matmuls were up to 1.3x slower on one CPU
    (nanoGPT's shape, 155 MB). docs/performance.md has the measurements.
    """
    return rows * vocab_size * 4 > PLAIN_LOGITS_MAX_BYTES


class ChunkedLoss(nn.Module):
    """
    A GPT for training: called like the GPT, model(idx, targets) -> (None, loss), with the
    same loss and gradients, but the (B, T, V) logits are never made (None comes back).
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets):
        x, targets = self.gpt.hidden_states(idx).flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        counted = targets != IGNORE  # chat data: only the answers' tokens are targets
        if not counted.all():
            x, targets = x[counted], targets[counted]
        rows = max(16, CHUNK_ELEMENTS // self.gpt.config.vocab_size)
        return None, LinearCrossEntropy.apply(x, self.gpt.lm_head.weight, targets, rows)


class LinearCrossEntropy(torch.autograd.Function):
    """
    cross_entropy(x @ weight.T, targets), mean over rows, without ever holding the (N, V)
    logits: the rows go through in chunks. Forward keeps only each row's log-sum-exp;
    backward recomputes a chunk's logits, turns them into softmax - one_hot(target)
    (the gradient of cross-entropy with respect to the logits) and accumulates the
    gradients of x and weight from it. With a 50,304-token vocabulary the full logits
    are hundreds of MB per step; a chunk stays in the CPU's cache (or a GPU's SRAM-near
    memory), which is where the time goes (see docs/performance.md).
    Under autocast the matmuls run in the autocast dtype, the softmax in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        softmax_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 if the inputs are
        with torch.autocast(device_type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            lse = torch.empty(x.size(0), device=x.device, dtype=softmax_dtype)
            target_logit = torch.empty_like(lse)
            for s in range(0, x.size(0), chunk_rows):
                logits = (xc[s : s + chunk_rows] @ wc.T).to(softmax_dtype)  # (n, V)
                lse[s : s + chunk_rows] = torch.logsumexp(logits, dim=-1)
                target_logit[s : s + chunk_rows] = logits.gather(1, targets[s : s + chunk_rows, None])[:, 0]
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.dtype, ctx.chunk_rows = dtype, chunk_rows
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse = ctx.saved_tensors
        n, chunk_rows = x.size(0), ctx.chunk_rows
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(ctx.dtype), weight.to(ctx.dtype)
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype)
            scale = grad_loss.to(lse.dtype) / n  # d loss / d (row's cross-entropy)
            shift = lse[:, None] - torch.log(scale) if scale > 0 else lse[:, None]  # fold scale into the exp
            for s in range(0, n, chunk_rows):
                rows = slice(s, s + chunk_rows)
                g = (xc[rows] @ wc.T).to(lse.dtype)  # (n, V) logits, then in place: scale * softmax
                g.sub_(shift[rows]).exp_()
                if not scale > 0:
                    g.mul_(scale)
                g[torch.arange(g.size(0), device=x.device), targets[rows]] -= scale  # - scale * one_hot(target)
                g = g.to(ctx.dtype)  # d loss / d logits
                grad_x[rows] = g @ wc
                grad_w += g.T @ xc[rows]
        return grad_x, grad_w.to(weight.dtype), None, None
