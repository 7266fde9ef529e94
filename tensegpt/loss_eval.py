"""
How well a model predicts a whole split, in units that compare any two models: bits per
byte (the total surprise over the text, divided by its UTF-8 bytes). A char model and a
GPT-2 model cut the same text into different tokens; per byte they compare.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch

from tensegpt.tokenizer import decode_examples


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
    device = next(model.parameters()).device
    n = len(tokens) - 1  # targets are tokens[1:]
    T = min(block_size, n)
    starts = list(range(0, n - T + 1, max(1, T // 2)))
    if starts[-1] != n - T:
        starts.append(n - T)
    total, counted, done = 0.0, 0, 0  # done: targets scored so far are tokens[1 : done + 1]
    for i in range(0, len(starts), batch_size):
        batch = starts[i : i + batch_size]
        windows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in batch])).to(
            device
        )
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


def held_out_loss(model, val, meta, tokenizer, batch_size):
    """val loss (nats per token), perplexity and bits per byte of a model over a split's token ids."""
    nats, counted = total_nats(model, val, model.config.block_size, batch_size)
    val_bytes = meta.get("val_bytes")
    # a meta.json without val_bytes (one of the first prepare.py's): one line break per example
    if val_bytes is None:
        val_bytes = sum(len(line.encode()) + 1 for line in decode_examples(tokenizer, val))
    return {
        "val_loss": nats / counted,
        "val_perplexity": math.exp(nats / counted),
        "bits_per_byte": nats / math.log(2) / val_bytes,
        "val_tokens": counted + 1,
        "val_bytes": val_bytes,
    }
