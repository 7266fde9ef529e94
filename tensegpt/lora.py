"""
LoRA (Hu et al. 2021): fine-tune a model by freezing its weights and training, beside each
chosen weight matrix W (out x in), a low-rank update B A (A: rank x in, B: out x rank),
scaled by alpha / rank:

    y = x W^T + b + (alpha / rank) * x A^T B^T

B starts at zero, so before the first step the model is exactly its base; A starts random
(as in the paper), so B's first gradient is not zero. Only A and B train: a few percent
of the parameters, and their optimizer state. merge() folds (alpha / rank) B A into W and
leaves a plain GPT, which is what sample.py, eval.py and export.py load.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tensegpt.common import UserError

# attention's q/k/v and output projections, the feed-forward's layers, the token embedding (tied)
TARGETS = ("c_attn", "c_proj", "c_fc", "wte")


class LoRALinear(nn.Module):
    """A frozen Linear's weight and bias, and the low-rank update that trains beside them."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the base: the same tensors, frozen
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self):
        """A plain Linear with W + scale * B A."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * self.lora_B @ self.lora_A)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class AdaptedEmbedding(nn.Module):
    """
    The token embedding, frozen, shared with the output layer as before (TiedOutput), and
    what trains of it: rows for tokens the base model never had (from fresh_from on: the
    chat tokens), whole, since a frozen copy of end-of-text could never become <|end|> or
    <|user|>; and with rank > 0 ('wte' among the targets) a low-rank update B A (B: V x
    rank, zero at first; A: rank x C, drawn at the embedding's own scale) over every row.
    The update is what lets a frozen model that was trained to continue text move its
    output distribution to answers (docs/chat.md measures what it changes).
    """

    def __init__(self, embedding, fresh_from, rank=0, alpha=1.0):
        super().__init__()
        weight = embedding.weight.detach()
        self.frozen = nn.Parameter(weight[:fresh_from], requires_grad=False)
        self.fresh = nn.Parameter(weight[fresh_from:].clone(), requires_grad=fresh_from < len(weight))
        self.scale = alpha / rank if rank else 0.0
        if rank:
            self.lora_A = nn.Parameter(torch.randn(rank, weight.size(1), device=weight.device) * 0.02)
            self.lora_B = nn.Parameter(torch.zeros(weight.size(0), rank, device=weight.device))

    @property
    def weight(self):
        weight = torch.cat([self.frozen, self.fresh])  # (V, C)
        return weight + self.scale * self.lora_B @ self.lora_A if self.scale else weight

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class TiedOutput(nn.Module):
    """The output layer whose weight is the embedding's (weight tying), whatever rows of it train."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = [embedding]  # a list: not a second registration of the same parameters

    @property
    def weight(self):
        return self.embedding[0].weight

    def forward(self, x):
        return F.linear(x, self.weight)


def check(config, gpt_config, initial=None):
    """
    The LoRA keys of a train.py config, checked: {rank, alpha, targets, fresh_from} or None
    when off. fresh_from: the first embedding row the base lacked (initial's, or a resumed run's).
    """
    rank = config["lora_rank"]
    if rank == 0:
        return None
    width = gpt_config.n_embd
    if not 0 < rank < width:
        raise UserError(f"--lora_rank must be between 1 and the width n_embd - 1 = {width - 1}, got {rank}")
    if config["lora_alpha"] <= 0:
        raise UserError(f"--lora_alpha must be > 0 (the update is scaled by alpha / rank), got {config['lora_alpha']}")
    targets = [t.strip() for t in config["lora_targets"].split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if not targets or unknown:
        raise UserError(
            f"--lora_targets names the matrices to adapt, from {','.join(TARGETS)}; got {config['lora_targets']!r}"
        )
    if config["fsdp"]:
        raise UserError("LoRA trains so few parameters that sharding them gains nothing: use --fsdp=False (DDP works)")
    initial = initial or {}
    fresh_from = initial.get("lora", initial).get("fresh_from", gpt_config.vocab_size)
    return {"rank": rank, "alpha": float(config["lora_alpha"]), "targets": targets, "fresh_from": fresh_from}


def add_adapters(gpt, lora):
    """
    Freezes every weight of gpt and puts a LoRALinear on each target Linear of its blocks;
    the embedding rows from lora["fresh_from"] on (tokens the base lacked) train, and with
    'wte' a low-rank update of the whole embedding (AdaptedEmbedding). Returns gpt.
    """
    for p in gpt.parameters():
        p.requires_grad_(False)
    fresh_from = lora.get("fresh_from", gpt.config.vocab_size)
    adapt_embedding = "wte" in lora["targets"]
    if fresh_from < gpt.config.vocab_size or adapt_embedding:
        rank = lora["rank"] if adapt_embedding else 0
        gpt.wte = AdaptedEmbedding(gpt.wte, fresh_from, rank, lora["alpha"])
        gpt.lm_head = TiedOutput(gpt.wte)
    for block in gpt.blocks:
        for parent in (block.attn, block.mlp):
            for name in lora["targets"]:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, LoRALinear(linear, lora["rank"], lora["alpha"]))
    return gpt


def merge(gpt):
    """Folds every adapter into its weight, in place: a plain GPT again (all weights trainable)."""
    if isinstance(gpt.wte, AdaptedEmbedding):
        weight = gpt.wte.weight.detach()
        gpt.wte = nn.Embedding(weight.size(0), weight.size(1), _weight=weight.clone(), device=weight.device)
        gpt.lm_head = nn.Linear(weight.size(1), weight.size(0), bias=False, device=weight.device)
        gpt.lm_head.weight = gpt.wte.weight  # tied again
    for block in gpt.blocks:
        for parent in (block.attn, block.mlp):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    setattr(parent, name, module.merged())
    for p in gpt.parameters():
        p.requires_grad_(True)
    return gpt


def split(gpt):
    """
    (the base's state dict, the adapters) of a GPT with adapters, what a PEFT export needs:
    the base is every frozen weight (an adapted embedding as its rows, without the low-rank
    update); the adapters, {"blocks.0.attn.c_attn": (A, B), ...}, and under "wte" the whole
    adapted embedding (new rows and update in), or None when the embedding was not adapted.
    """
    base, adapters = {}, {"wte": None}
    for name, tensor in gpt.state_dict().items():
        if name.endswith((".lora_A", ".lora_B")) or name.startswith("wte."):
            continue
        base[name] = tensor
    for name, module in gpt.named_modules():
        if isinstance(module, LoRALinear):
            adapters[name] = (module.lora_A.detach(), module.lora_B.detach())
    if isinstance(gpt.wte, AdaptedEmbedding):
        base["wte.weight"] = torch.cat([gpt.wte.frozen, gpt.wte.fresh]).detach()
        adapters["wte"] = gpt.wte.weight.detach()
    else:
        base["wte.weight"] = gpt.wte.weight.detach()
    base["lm_head.weight"] = base["wte.weight"]
    return base, adapters


def describe(gpt, lora):
    """The line train.py prints: what trains, out of how many parameters."""
    params = list(gpt.parameters())
    trained, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return (
        f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])}: "
        f"training {trained:,} of {total:,} parameters ({100 * trained / total:.1f}%); the rest are frozen"
    )
