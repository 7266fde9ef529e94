"""
The whole GPT in one file, in the order data flows through it:

    token ids -> token embedding + positional encoding -> n_layer x Block -> norm -> logits
    Block: x + attention(norm(x)), then x + feed_forward(norm(x))   (pre-norm, GPT-2)

then generation: the KV cache and the sampling step. After "Attention Is All You Need" (Vaswani et al. 2017) and
GPT-2 (Radford et al. 2019: pre-LayerNorm, learned positions, tied embeddings, the scaled initialisation). It needs
only torch: copy it into your own project and `from model import GPT, GPTConfig`.

The defaults are GPT-2's block. Each newer idea is one switch of GPTConfig (its fields name the papers), written next
to the GPT-2 piece it replaces; config/modern.py turns them all on.

The contract: train, sample, eval, serve and export use this much of the file and nothing else, so a fork may change
anything behind it and every stage keeps working (each stage checks itself against forward, and says what differs):
    GPTConfig, check_config          the settings (a new field becomes a train.py --key=value by itself)
    GPT(config)                      the model, initialised by its modules' constructors (a fork's own stays)
    model(idx, targets, caches=, input_pos=, mask=, logits_at=) -> (logits, loss): every logit anyone uses
    KVCache, model.new_caches(B)     the cache forward fills: anything with update(input_pos, k, v) will do
    model.generate, generate_stream  and the sampling step: sample_next, next_token_probs, draw, filter_logits,
                                     penalize_repetition
    model.grad_checkpointing         train.py's --grad_checkpointing
Positions come one way (input_pos: an int start, or a (B, T) tensor of each token's own position) and masks one kind
(bool, True where a query may see a key), built by attention_mask unless a caller lays its keys out its own way.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu", "relu2", "swiglu")
ATTENTIONS = ("sdpa", "explicit")
IGNORE = -100  # a target the loss leaves out (a chat prompt's tokens): F.cross_entropy's ignore_index
# the loss over (rows, V) logits bigger than this runs in chunks, each recomputed in backward (GPT-2's vocabulary)
LOGITS_MAX_BYTES = 256 << 20
CHUNK_LOGITS = 3 << 20  # logits in each of those chunks: 12 MB in float32, about what stays in a CPU's cache


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 (faster matmuls)
    block_size: int = 256  # the longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 0  # feed-forward hidden size; 0: 4 * n_embd (swiglu: 8/3 * n_embd, see below)
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers and LayerNorms (GPT-2: True)
    pos_encoding: str = "learned"  # 'learned' (GPT-2), 'sinusoidal' (Vaswani et al.), 'rotary' (Su et al. 2021)
    activation: str = "gelu"  # 'gelu' (GPT-2), 'relu', 'relu2' (squared, So et al. 2021), 'swiglu' (Shazeer 2020)
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (Zhang & Sennrich 2019)
    n_kv_head: int = 0  # key/value heads dividing n_head: grouped-query attention (Ainslie et al. 2023); 0: n_head
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (Henry et al. 2020; Dehghani et al. 2023)
    # how attention's softmax(q k^T / sqrt(d)) v is computed, the same numbers either way: 'sdpa' (PyTorch's fused
    # kernel) or 'explicit' (written out: what torch.compile fuses best on a CPU, and what sample.py draws)
    attention: str = "sdpa"

    def __post_init__(self):
        if self.d_ff == 0:
            # SwiGLU has 3 matrices, not 2: 2/3 of the width keeps the parameter count (LLaMA), rounded up to 32
            swiglu = self.activation == "swiglu"
            self.d_ff = -(-8 * self.n_embd // 3 // 32) * 32 if swiglu else 4 * self.n_embd
        self.n_kv_head = self.n_kv_head or self.n_head


def check_config(config):
    """The ways a config can be impossible, each as a message naming the key; [] when fine."""
    problems = []
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff", "n_kv_head"):
        if getattr(config, key) <= 0:
            problems.append(f"{key} must be positive, got {getattr(config, key)}")
    if config.n_head > 0 and config.n_embd % config.n_head:
        problems.append(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    elif config.n_head > 0 and config.pos_encoding == "rotary" and config.n_embd // config.n_head % 2:
        problems.append(f"rotary: the head size n_embd / n_head ({config.n_embd // config.n_head}) must be even")
    if config.n_kv_head > 0 and config.n_head % config.n_kv_head:
        problems.append(f"n_kv_head ({config.n_kv_head}) must divide n_head ({config.n_head}): each serves a group")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    choices = (("pos_encoding", POS_ENCODINGS), ("activation", ACTIVATIONS), ("norm", NORMS), ("attention", ATTENTIONS))
    for key, allowed in choices:
        if getattr(config, key) not in allowed:
            problems.append(f"{key} must be one of {', '.join(allowed)}; got {getattr(config, key)!r}")
    return problems


def gpt2_init(module, std=0.02):
    """GPT-2's initialisation of a Linear or an Embedding, called where it is made: weight N(0, std), bias 0."""
    nn.init.normal_(module.weight, 0.0, std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


# ----------------------------------------------------------------------------- positions and norms
def positions(input_pos, T, device=None):
    """The positions of T new tokens: (1, T) after an int start, or input_pos itself, a (B, T) tensor."""
    if isinstance(input_pos, int):
        return torch.arange(input_pos, input_pos + T, device=device)[None]
    return input_pos


def attention_mask(input_pos, queries, end):
    """
    Which of the keys 0..end-1 each new query may see, built once for every layer: (B or 1, 1, T, S) bool, True where a
    query at position p meets a key at position <= p; queries: the positions (B or 1, T) of the new tokens. None where
    attention's own rule gives that without a mask (see CausalSelfAttention.forward): T tokens from position 0
    (training, a first prompt), or one token after a cache.
    """
    if isinstance(input_pos, int) and (input_pos == 0 or queries.size(1) == 1):
        return None
    keys = torch.arange(end, device=queries.device)  # (S,)
    return (keys <= queries[..., None])[:, None]  # (B or 1, 1, T, S)


def angles(positions, d):
    """The angle p * 10000^(-2i/d) of each position p (B or 1, T) and pair i of d dimensions: (B or 1, T, d/2)."""
    frequency = 10000.0 ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
    return positions.float()[..., None] * frequency


def sinusoidal_positions(positions, n_embd):
    """Vaswani et al.'s PE(p, 2i) = sin(angle), PE(p, 2i+1) = cos(angle) at positions (B, T): (B, T, C)."""
    angle = angles(positions, n_embd)  # (B, T, C/2)
    # sin and cos interleaved: (B, T, C/2, 2) -> (B, T, C)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[..., :n_embd]


def rotary(positions, d):
    """
    The cos and sin of rotary's angles at positions (B or 1, T) for heads of size d: each (B or 1, 1, T, d/2), the same
    for every head. Computed once a forward pass and handed to every layer, like the mask.
    """
    angle = angles(positions, d)[:, None]
    return angle.cos(), angle.sin()


def rotate(x, rope):
    """
    Rotary position embedding (Su et al. 2021): the pairs (x_i, x_{i + d/2}) of each head's query or key at position p
    turn by the angle p * 10000^(-2i/d). A query at p and a key at p' then meet at an angle that depends only on p - p':
    attention sees relative positions. x (B, heads, T, d), rope: rotary(positions, d).
    """
    d, (cos, sin) = x.size(-1), rope
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RMSNorm(nn.RMSNorm):
    # in bfloat16 (autocast, or a server's bfloat16 weights) normalise in float32, as autocast runs LayerNorm (and as
    # Llama does). Written out: on a CPU, F.rms_norm of one token's vector costs several times these few operations
    def forward(self, x):
        # casts only where a dtype is not float32 already: each is a call of its own per token
        x32 = x if x.dtype == torch.float32 else x.float()
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        y = x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) / x.size(-1) + self.eps) * weight
        return y if y.dtype == x.dtype else y.type_as(x)


def make_norm(config, size):
    # LayerNorm centres and scales each vector; RMSNorm (Zhang & Sennrich 2019) only scales it by its root mean
    # square: one reduction fewer, and it trains as well
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=1e-5)
    return nn.LayerNorm(size, bias=config.bias)


# ----------------------------------------------------------------------------- the block
class KVCache:
    """
    The keys and values one attention layer has seen, one row per sequence: those of earlier positions never change
    (attention is causal), so each new token runs the model on its own position only. A server lays out its own
    (tensegpt/engine.py): anything with this update method will do.
    """

    def __init__(self, shape, device=None, dtype=None):
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, n_kv_head, block_size, hs)
        self.v = torch.zeros_like(self.k)

    def update(self, input_pos, k, v):
        """Stores k, v (B, n_kv_head, T, hs) at their positions; returns the keys and values of positions 0..last."""
        if isinstance(input_pos, int):
            end = input_pos + k.size(2)
            self.k[:, :, input_pos:end], self.v[:, :, input_pos:end] = k, v
        else:
            rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
            # indexing rows and positions together puts them first: (B, T, n_kv_head, hs)
            self.k[rows, :, input_pos], self.v[rows, :, input_pos] = k.transpose(1, 2), v.transpose(1, 2)
            end = int(input_pos.max()) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        # grouped-query attention: fewer key/value heads than query heads
        kv_size = self.n_kv_head * self.head_size
        # queries, keys and values of every head from one matmul
        self.c_attn = gpt2_init(nn.Linear(config.n_embd, config.n_embd + 2 * kv_size, bias=config.bias))
        # each residual branch adds to the stream: the layers that write into it get 0.02 / sqrt(2 * n_layer), so
        # the stream's variance stays flat however deep (GPT-2)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_proj = gpt2_init(nn.Linear(config.n_embd, config.n_embd, bias=config.bias), residual_std)
        self.rotary, self.qk_norm = config.pos_encoding == "rotary", config.qk_norm
        if self.qk_norm:
            # unit-scale queries and keys keep the logits from growing without bound (loss spikes)
            self.q_norm, self.k_norm = RMSNorm(self.head_size, eps=1e-5), RMSNorm(self.head_size, eps=1e-5)
        self.explicit = config.attention == "explicit"
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, input_pos=0, rope=None):
        """
        x (B, T, C) -> (B, T, C). mask: which of the S keys each query may see (attention_mask), True where it may;
        None: the keys are the sequence's own from position 0 and query i sees those up to its own, S - T + i (T == S:
        the causal square; T == 1: every key). rope: rotary's angles of the T positions.
        """
        B, T, C = x.shape
        kv_size = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_size, kv_size], dim=2)
        # (B, T, heads * hs) -> (B, heads, T, hs): each head attends in its own subspace
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            # a key turns by the angle of its own position, and keeps it in the cache
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is not None:
            # the new keys and values join the cached ones: (B, n_kv_head, S, hs)
            k, v = cache.update(input_pos, k, v)
        # grouped-query attention: each key/value head serves n_head / n_kv_head consecutive query heads, read in
        # place (copying the keys out per query head would copy the whole cache every token)
        S, group = k.size(2), self.n_head // self.n_kv_head
        if self.explicit:
            # softmax(q k^T / sqrt(hs)) v, where a query may not see a key after it; the query heads of a group
            # side by side: (B, n_kv_head, group * T, hs)
            q = q.reshape(B, self.n_kv_head, group * T, self.head_size)
            scores = (q @ k.transpose(-2, -1) / math.sqrt(self.head_size)).view(B, self.n_head, T, S)
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, n_head, T, S)
            # attn_dropout sees the weights: sample.py --attention draws them from a hook on it
            weights = self.attn_dropout(weights).view(B, self.n_kv_head, group * T, S)
            y = (weights @ v).view(B, self.n_head, T, self.head_size)
        else:
            # the same computation fused, never holding the (T, S) weights; is_causal: the causal square
            dropout = self.attn_dropout.p if self.training else 0.0
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=group > 1
            )
        # the heads side by side again: (B, T, C)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.activation
        # SwiGLU: a gate and a value from two matrices (one matmul here), silu(gate) * value
        width = 2 * config.d_ff if config.activation == "swiglu" else config.d_ff
        self.c_fc = gpt2_init(nn.Linear(config.n_embd, width, bias=config.bias))
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_proj = gpt2_init(nn.Linear(config.d_ff, config.n_embd, bias=config.bias), residual_std)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.activation == "swiglu":  # Shazeer 2020, "GLU Variants Improve Transformer"
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu2":  # squared ReLU (So et al. 2021, Primer)
            h = F.relu(h).square()
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # tanh: GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = FeedForward(config)

    def forward(self, x, mask=None, cache=None, input_pos=0, rope=None):
        # pre-norm: normalise the input of each sublayer, keep the residual path an identity
        x = x + self.attn(self.ln_1(x), mask, cache, input_pos, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------- the model
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if problems := check_config(config):
            raise ValueError("; ".join(problems))
        self.config = config
        self.wte = gpt2_init(nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_encoding == "learned":
            self.wpe = gpt2_init(nn.Embedding(config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the output layer is the token embedding; fewer parameters, trains better
        self.lm_head.weight = self.wte.weight
        self.grad_checkpointing = False  # train.py's --grad_checkpointing

    def num_params(self, non_embedding=False):
        """Parameter count (the tied output layer counted once). non_embedding leaves out positions."""
        n = sum(p.numel() for p in self.parameters())  # under FSDP: the whole model's, not a shard's
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, caches=None, input_pos=0, mask=None, logits_at=None):
        """
        idx (B, T) token ids -> (logits, loss).
        targets (B, T), the ids that come next (IGNORE: not counted): logits (B, T, V) and the mean cross-entropy.
            Where those logits would pass LOGITS_MAX_BYTES, the loss is computed in chunks and logits is None.
        No targets: the last position's logits (B, 1, V), all generation needs, or with logits_at (N,), indices into
            the B * T positions, theirs: (N, V). loss None.
        input_pos: the tokens' positions, an int start (positions input_pos.. in every row) or a (B, T) tensor.
        caches: one KVCache per layer (new_caches) that keeps the keys and values; mask: the keys each query sees,
            from a caller that lays its cache out its own way (sequences packed in one row); None: attention_mask.
        """
        T = idx.size(1)
        # each new token's position (B or 1, T), and how many positions the sequences reach: computed once
        pos = positions(input_pos, T, idx.device)
        end = input_pos + T if isinstance(input_pos, int) else int(input_pos.max()) + 1
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.wpe(pos)  # (B or 1, T, C)
        elif self.config.pos_encoding == "sinusoidal":
            # the paper scales embeddings by sqrt(d_model) so the fixed sinusoids don't drown them
            pe = sinusoidal_positions(pos, self.config.n_embd)
            x = x * math.sqrt(self.config.n_embd) + pe.to(x.dtype)
        # rotary: no position is added here; attention rotates its queries and keys instead
        x = self.drop(x)
        # what every layer needs of the positions, computed once: which keys each query sees, rotary's angles
        if mask is None:
            mask = attention_mask(input_pos, pos, end)
        rope = None
        if self.config.pos_encoding == "rotary":
            rope = rotary(pos, self.config.n_embd // self.config.n_head)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                # keep only each block's input; recompute its insides in backward (less memory)
                x = torch.utils.checkpoint.checkpoint(block, x, mask, None, input_pos, rope, use_reentrant=False)
            else:
                x = block(x, mask, None if caches is None else caches[i], input_pos, rope)
        x = self.ln_f(x)  # (B, T, C)
        if targets is not None:
            return self.loss(x, targets)
        x = x[:, -1:] if logits_at is None else x.flatten(0, 1)[logits_at]
        return self.output(x), None

    def output(self, x):
        """The logits of hidden states x (..., C): the one place they are made, for every caller (a soft-cap: here)."""
        return self.lm_head(x)

    def loss(self, x, targets):
        """(logits, mean cross-entropy over the counted targets) of hidden states x (B, T, C): see forward."""
        B, T, C = x.shape
        if B * T * self.config.vocab_size * 4 <= LOGITS_MAX_BYTES:
            logits = self.output(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            return logits, loss
        # big logits (GPT-2's 50,304 tokens: hundreds of MB a step): a chunk of rows at a time, each chunk's logits
        # made again in backward instead of kept, so that one chunk's at most are ever held
        x, targets = x.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        rows, total = max(16, CHUNK_LOGITS // self.config.vocab_size), 0.0
        for s in range(0, B * T, rows):
            chunk = (x[s : s + rows], targets[s : s + rows])
            total = total + torch.utils.checkpoint.checkpoint(self.summed_loss, *chunk, use_reentrant=False)
        return None, total / (targets != IGNORE).sum().clamp_min(1)

    def summed_loss(self, x, targets):
        return F.cross_entropy(self.output(x), targets, ignore_index=IGNORE, reduction="sum")

    # ------------------------------------------------------------------------- generation
    def new_caches(self, batch_size, device=None, dtype=None):
        """One KVCache per layer, for batch_size sequences of up to block_size tokens."""
        c, p = self.config, self.wte.weight
        shape = (batch_size, c.n_kv_head, c.block_size, c.n_embd // c.n_head)
        return [KVCache(shape, device=device or p.device, dtype=dtype or p.dtype) for _ in range(c.n_layer)]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, **sampling):
        """Appends up to max_new_tokens tokens to idx (B, T) and returns (B, T + new); see generate_stream."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **sampling)], dim=1)

    @torch.inference_mode()  # like no_grad, and skips autograd's version counting: faster steps
    def generate_stream(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
        stop_token=None, use_cache=True, generator=None, repetition_penalty=1.0,
    ):  # fmt: skip
        """
        Yields the next token ids (B, 1) one step at a time, so a caller can print as they come, until max_new_tokens or
        until every row has produced stop_token. With the KV cache each new token runs the model on one position. The
        model sees at most block_size tokens: past that, the oldest fall out of the window, and since every position
        then moves, the cache is rebuilt from the window (exactly what a full recompute would see). use_cache=False
        recomputes the whole window every token.
        """
        block_size = self.config.block_size
        caches, cached = None, 0  # cached: how many positions the cache holds
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]
            if not use_cache:
                logits, _ = self(window)
            elif caches is not None and window.size(1) == cached + 1:
                logits, _ = self(window[:, -1:], caches=caches, input_pos=cached)  # one position's work
                cached += 1
            else:  # first step, or the window slid: (re)fill the cache from the whole window
                caches = caches or self.new_caches(idx.size(0))
                logits, _ = self(window, caches=caches)
                cached = window.size(1)
            logits = logits[:, -1, :]  # (B, V)
            if repetition_penalty != 1.0:
                logits = penalize_repetition(logits, idx, repetition_penalty)
            next_id = sample_next(logits, temperature, top_k, top_p, greedy, generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id
            if stop_token is not None:
                finished |= next_id.squeeze(1) == stop_token
                if bool(finished.all()):
                    return


# ----------------------------------------------------------------------------- sampling
def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """logits (B, V) of the last position -> next ids (B, 1): the most likely, or a draw from next_token_probs."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(next_token_probs(logits, temperature, top_k, top_p), generator)


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """
    The distribution of the next token, (B, V) logits -> (B, V): / temperature (a number, or (B, 1): one per row),
    top_k, top_p, softmax.
    """
    # subtracting the max first: a tiny temperature then gives 0 and -huge, never inf - inf = nan
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    return torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)


def draw(probs, generator=None, u=None):
    """
    One token per row of probs (B, V), drawn with its probability: torch.multinomial(probs, 1) at a tenth of its cost
    over 50,304 tokens, by inverse-CDF sampling: the first token whose cumulative probability passes a uniform number u.
    u: (B, 1) numbers in [0, 1), drawn here from generator when not given (a server draws each row's from its own).
    """
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing
    if u is None:
        u = torch.rand((cdf.size(0), 1), device=cdf.device, generator=generator)
    u = u * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True)  # a token with no probability covers no interval
    # u rounded up to the total: take the last token that has probability
    return torch.minimum(choice, torch.searchsorted(cdf, cdf[:, -1:].contiguous()))


def filter_logits(logits, top_k=None, top_p=None):
    """
    Sets to -inf every logit outside the top_k largest and outside the nucleus (Holtzman et al. 2019): the smallest set
    of most likely tokens whose probabilities add up to at least top_p. The top token survives.
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # the tokens before it already reach top_p
        # the top token stays even when top_p rounds to 0 in the logits' dtype
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def penalize_repetition(logits, idx, penalty):
    """
    CTRL's repetition penalty (Keskar et al. 2019): for every token already in idx, a positive logit is divided by
    penalty and a negative one multiplied, so with penalty > 1 a repeat always becomes less likely.
    """
    seen = torch.gather(logits, 1, idx)  # (B, T): the logits of the tokens already present
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, idx, seen)
