"""
The whole GPT in one file, in the order data flows through it:

    token ids -> token embedding + positional encoding -> n_layer x Block -> norm -> logits
    Block: x + attention(norm(x)), then x + feed_forward(norm(x))   (pre-norm, GPT-2)

References: "Attention Is All You Need" (Vaswani et al. 2017) for the transformer and the
sinusoidal positions; GPT-2 (Radford et al. 2019) for pre-LayerNorm, learned positions,
tied embeddings and the scaled initialisation; nanoGPT for the shape of this file.

The defaults are GPT-2's block. Each newer idea is one switch of GPTConfig, written next
to the GPT-2 piece it replaces (config/modern.py turns them all on):
    pos_encoding='rotary'   rotary position embeddings (Su et al. 2021)
    norm='rmsnorm'          RMSNorm (Zhang & Sennrich 2019)
    activation='swiglu'     SwiGLU (Shazeer 2020); 'relu2': squared ReLU (So et al. 2021)
    n_kv_head < n_head      grouped-query attention (Ainslie et al. 2023)
    qk_norm=True            QK-norm (Henry et al. 2020; Dehghani et al. 2023)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


CHUNKED_LOSS_MIN_VOCAB = 2048  # from this vocabulary size up, training uses LinearCrossEntropy
CHUNK_ELEMENTS = 3 << 20  # logits per chunk: 12 MB in float32, about what stays in a CPU's cache
POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu", "relu2", "swiglu")


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 (faster matmuls)
    block_size: int = 256  # the longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 0  # hidden size of the feed-forward network; 0: 4 * n_embd (swiglu: 8/3 * n_embd, see below)
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers and LayerNorms (GPT-2: True)
    pos_encoding: str = "learned"  # 'learned' (GPT-2), 'sinusoidal' (Vaswani et al.) or 'rotary' (Su et al.)
    activation: str = "gelu"  # 'gelu' (GPT-2's tanh approximation), 'relu' (Vaswani et al.), 'relu2' or 'swiglu'
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm'
    n_kv_head: int = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0 means n_head
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before their dot product

    def __post_init__(self):
        if self.d_ff == 0:
            # SwiGLU has three matrices instead of two: 2/3 of the width keeps the parameter
            # count (LLaMA's rule), rounded up to a multiple of 32 for the matmuls
            self.d_ff = -(-8 * self.n_embd // 3 // 32) * 32 if self.activation == "swiglu" else 4 * self.n_embd
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head


def check_config(config):
    """The ways a config can be impossible, each as a message naming the key; [] when fine."""
    problems = []
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff", "n_kv_head"):
        if getattr(config, key) <= 0:
            problems.append(f"{key} must be positive, got {getattr(config, key)}")
    if config.n_head > 0 and config.n_embd % config.n_head:
        problems.append(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    elif config.n_head > 0 and config.pos_encoding == "rotary" and config.n_embd // config.n_head % 2:
        problems.append(f"rotary positions turn pairs of numbers: the head size n_embd / n_head ({config.n_embd // config.n_head}) must be even")
    if config.n_kv_head > 0 and config.n_head % config.n_kv_head:
        problems.append(f"n_kv_head ({config.n_kv_head}) must divide n_head ({config.n_head}): each key/value head serves a group of query heads")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    for key, allowed in (("pos_encoding", POS_ENCODINGS), ("activation", ACTIVATIONS), ("norm", NORMS)):
        if getattr(config, key) not in allowed:
            problems.append(f"{key} must be one of {', '.join(allowed)}; got {getattr(config, key)!r}")
    return problems


def sinusoidal_positions(start, length, n_embd, device=None):
    """Rows start..start+length-1 of PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): section 3.5."""
    position = torch.arange(start, start + length, dtype=torch.float32, device=device).unsqueeze(1)  # (T, 1)
    frequency = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / n_embd))
    pe = torch.zeros(length, n_embd, device=device)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)[:, : n_embd // 2]
    return pe  # (T, C)


def rotate(x, start):
    """
    Rotary position embedding (Su et al. 2021, RoFormer): the pairs (x_i, x_{i + d/2}) of
    each head's query or key at position p turn by the angle p * 10000^(-2i/d). A query at
    p and a key at p' then meet at an angle that depends only on p - p', so attention sees
    relative positions. x (B, heads, T, d) at positions start..start+T-1.
    """
    d = x.size(-1)
    frequency = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    angle = torch.arange(start, start + x.size(2), device=x.device, dtype=torch.float32)[:, None] * frequency  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def make_norm(config, size):
    # LayerNorm centres and scales each vector; RMSNorm (Zhang & Sennrich 2019) only
    # scales it by its root mean square: one reduction fewer, and it trains as well
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=1e-5)
    return nn.LayerNorm(size, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        kv_size = self.n_kv_head * self.head_size  # grouped-query attention: fewer key/value heads than query heads
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_size, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.rotary = config.pos_encoding == "rotary"
        if config.qk_norm:
            # unit-scale queries and keys keep the logits from growing without bound (a cause of loss spikes)
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_size, eps=1e-5), nn.RMSNorm(self.head_size, eps=1e-5)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_weights = False  # True: the explicit path, which keeps its (B, n_head, T, T) weights

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size], dim=2)
        # (B, T, heads * head_size) -> (B, heads, T, head_size): each head attends in its own subspace
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2) for t in (k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = rotate(q, pos), rotate(k, pos)  # a cached key keeps the rotation of its own position
        if cache is not None:
            # KV cache: keys and values of earlier positions never change (causal), so
            # store them once and attend the new queries to all of them.
            k_cache, v_cache = cache  # (B, n_kv_head, block_size, head_size)
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv_head query heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))  # (B, n_head, T_keys, hs)
        if self.keep_weights:
            # the same attention written out, for a caller that wants to see the weights
            # (sample.py --attention): softmax(q k^T / sqrt(head_size)), j > i masked
            scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, n_head, T, T_keys)
            future = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).triu(k.size(2) - T + 1)
            self.weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            y = self.weights @ v
        else:
            # is_causal masks position i from seeing j > i. One new query (T == 1) may see
            # every cached key, so it needs no mask. Generation only prefills at pos == 0.
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.activation
        # SwiGLU: a gate and a value from two matrices (one matmul here), silu(gate) * value
        width = 2 * config.d_ff if config.activation == "swiglu" else config.d_ff
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
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

    def forward(self, x, cache=None, pos=0):
        # pre-norm: normalise the input of each sublayer, keep the residual path an identity
        x = x + self.attn(self.ln_1(x), cache, pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        problems = check_config(config)
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        device = torch.get_default_device()
        # Shapes first, on the meta device (no memory, no random numbers): each layer's own
        # initialisation would only be drawn and thrown away, and this way a model built
        # whole and one sharded by FSDP draw the same numbers in init_weights.
        with torch.device("meta"):
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            if config.pos_encoding == "learned":
                self.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
            self.ln_f = make_norm(config, config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if device.type != "meta":
            self.to_empty(device=device)
        # The output layer shares its weight with the token embedding (weight tying,
        # Press & Wolf 2017): fewer parameters, and it trains better at this size.
        self.lm_head.weight = self.wte.weight

        self.grad_checkpointing = False  # train.py's --grad_checkpointing
        # Training computes the output layer and the loss in chunks of rows where that is
        # faster: with a large vocabulary (measured on a 2-core CPU: 1.5x at 50,304 rows, 1.3x at
        # 2,048, but 0.7x at 1,152, where one plain matmul is cheaper than the loop).
        self.chunked_loss = config.vocab_size >= CHUNKED_LOSS_MIN_VOCAB
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """
        GPT-2's initialisation: matrices N(0, 0.02), biases 0, norm gains 1. Each residual
        branch adds to the stream, so the projections that write into it (c_proj) get
        0.02 / sqrt(2 * n_layer), which keeps the stream's variance flat with depth.
        Parameter by parameter in a fixed order from the global RNG, each drawn whole: a
        model built on the meta device and sharded across processes (train.py --fsdp)
        gets exactly the numbers one process would, while holding one tensor at a time.
        """
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue  # nothing to fill yet: to_empty(), then init_weights() again
            full = torch.empty(p.shape)
            if name.endswith("c_proj.weight"):
                full.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                full.normal_(0.0, 0.02)
            else:
                full.fill_(0.0 if name.endswith(".bias") else 1.0)
            full = full.to(device=p.device, dtype=p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP shard (a DTensor): keep this process's part
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)

    def num_params(self, non_embedding=False):
        """Parameter count (the tied output layer counted once). non_embedding leaves out positions."""
        n = sum(p.numel() for p in self.parameters())  # under FSDP: the whole model's, not a shard's
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self):
        """
        Training FLOPs per token (PaLM, appendix B): 6 per weight (2 forward, 4 backward),
        plus attention's scores and weighted sum, 12 * n_layer * block_size * n_embd.
        """
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.block_size * c.n_embd

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        """Model FLOPs utilisation: the share of the hardware's peak FLOP/s that training uses."""
        return self.flops_per_token() * tokens_per_sec / peak_flops

    def forward(self, idx, targets=None, caches=None, pos=0):
        """
        idx (B, T) token ids -> (logits, loss). With targets (B, T): logits (B, T, V) and
        the mean cross-entropy; in training mode with a large vocabulary (chunked_loss)
        the logits are never made and None comes back instead. Without targets: logits of
        the last position only (B, 1, V), all that generation needs. caches/pos: the KV
        cache, see generate_stream().
        """
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.wpe.weight[pos : pos + T]  # rows pos..pos+T-1: an embedding lookup of a range
        elif self.config.pos_encoding == "sinusoidal":
            # the paper scales embeddings by sqrt(d_model) so the fixed sinusoids don't drown them
            x = x * math.sqrt(self.config.n_embd) + sinusoidal_positions(pos, T, self.config.n_embd, x.device).to(x.dtype)
        # rotary: no position is added here; attention rotates its queries and keys instead
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                # keep only each block's input; recompute its insides in backward (less memory)
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if caches is None else caches[i], pos)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        if self.training and self.chunked_loss:  # no (B, T, V) logits at all: see LinearCrossEntropy
            rows = max(16, CHUNK_ELEMENTS // self.config.vocab_size)
            return None, LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.view(-1), rows)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx):
        """Every layer's attention weights for idx (1, T), from the model's own attention: [(n_head, T, T)]."""
        for block in self.blocks:
            block.attn.keep_weights = True
        try:
            self(idx)
            return [block.attn.weights[0] for block in self.blocks]
        finally:
            for block in self.blocks:
                block.attn.keep_weights, block.attn.weights = False, None

    # ------------------------------------------------------------------ generation

    def new_caches(self, batch_size, device=None, dtype=None):
        """One (keys, values) pair per layer, each (B, n_kv_head, block_size, head_size)."""
        c = self.config
        p = self.wte.weight
        shape = (batch_size, c.n_kv_head, c.block_size, c.n_embd // c.n_head)
        return [
            (torch.empty(shape, device=device or p.device, dtype=dtype or p.dtype),
             torch.empty(shape, device=device or p.device, dtype=dtype or p.dtype))
            for _ in range(c.n_layer)
        ]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
                 stop_token=None, use_cache=True, generator=None, repetition_penalty=1.0):
        """
        Appends up to max_new_tokens tokens to idx (B, T) and returns (B, T + new).
        Stops early once every row has produced stop_token. See generate_stream.
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        greedy=greedy, stop_token=stop_token, use_cache=use_cache, generator=generator,
                                        repetition_penalty=repetition_penalty))
        return torch.cat([idx, *new], dim=1)

    @torch.inference_mode()  # like no_grad, and skips autograd's version counting: faster steps
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
                        stop_token=None, use_cache=True, generator=None, repetition_penalty=1.0):
        """
        Yields the next token ids (B, 1) one step at a time, so a caller can print as they come.

        With the KV cache each new token runs the model on one position. The model sees
        at most block_size tokens: past that, the oldest fall out of the window, and since
        every position then moves, the cache is rebuilt from the window (exactly what a
        full recompute would see). use_cache=False recomputes the whole window for every
        token (for comparison).
        """
        block_size = self.config.block_size
        caches, cached = None, 0  # cached: how many positions the cache holds
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]
            if not use_cache:
                logits, _ = self(window)
            elif caches is not None and window.size(1) == cached + 1:
                logits, _ = self(window[:, -1:], caches=caches, pos=cached)  # one position's work
                cached += 1
            else:  # first step, or the window slid: (re)fill the cache from the whole window
                caches = caches or self.new_caches(idx.size(0))
                logits, _ = self(window, caches=caches, pos=0)
                cached = window.size(1)
            logits = logits[:, -1, :]
            if repetition_penalty != 1.0:
                logits = penalize_repetition(logits, idx, repetition_penalty)
            next_id = sample_next(logits, temperature, top_k, top_p, greedy, generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id
            if stop_token is not None:
                finished |= next_id.squeeze(1) == stop_token
                if bool(finished.all()):
                    return

    @torch.no_grad()
    def beam_search(self, idx, beams, max_new_tokens, stop_token=None, length_penalty=1.0):
        """
        The continuation of idx (1, T) with the highest length-normalised log-probability
        found by keeping the `beams` best partial continuations at each step. Returns
        (new token ids, their total log-probability). A continuation ends at stop_token;
        candidates are compared by log-probability / length**length_penalty (Wu et al.
        2016), so that longer ones are not punished just for having more terms.
        """
        block_size = self.config.block_size
        alive = [(idx[0].tolist(), [], 0.0)]  # (context, new tokens, log-probability)
        done = []
        for _ in range(max_new_tokens):
            contexts = torch.tensor([c[-block_size:] for c, _, _ in alive], device=idx.device)  # (beams, T)
            logits, _ = self(contexts)
            logprobs = torch.log_softmax(logits[:, -1, :].float(), dim=-1)  # (beams, V)
            totals = torch.tensor([lp for _, _, lp in alive], device=idx.device)[:, None] + logprobs
            # 2 * beams candidates: even if half of them end here, beams live ones remain
            best = torch.topk(totals.view(-1), min(2 * beams, totals.numel()))
            alive_next = []
            for score, flat in zip(best.values.tolist(), best.indices.tolist()):
                row, token = divmod(flat, logprobs.size(1))
                context, new, _ = alive[row]
                if stop_token is not None and token == stop_token:
                    done.append((context + [token], new + [token], score))
                elif len(alive_next) < beams:
                    alive_next.append((context + [token], new + [token], score))
            alive = alive_next
            # stop once beams continuations have ended and the best of them beats every live one as it stands
            done.sort(key=lambda c: normalised(c, length_penalty), reverse=True)
            if len(done) >= beams and normalised(done[0], length_penalty) >= max(normalised(c, length_penalty) for c in alive):
                break
        best = max(done + alive, key=lambda c: normalised(c, length_penalty))
        return best[1], best[2]


class LinearCrossEntropy(torch.autograd.Function):
    """
    cross_entropy(x @ weight.T, targets), mean over rows, without ever holding the (N, V)
    logits: the rows go through in chunks. Forward keeps only each row's log-sum-exp;
    backward recomputes a chunk's logits, turns them into softmax - one_hot(target)
    (the gradient of cross-entropy with respect to the logits) and accumulates the
    gradients of x and weight from it. With a 50,304-token vocabulary the full logits
    are hundreds of MB per step; a chunk stays in the CPU's cache (or a GPU's SRAM-near
    memory), which is where the time goes (see the README's Performance section).
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


def normalised(candidate, length_penalty):
    _, new, logprob = candidate
    return logprob / (len(new) ** length_penalty)


def penalize_repetition(logits, idx, penalty):
    """
    CTRL's repetition penalty (Keskar et al. 2019): for every token already in idx, a
    positive logit is divided by penalty and a negative one multiplied, so with
    penalty > 1 a repeat always becomes less likely.
    """
    seen = torch.gather(logits, 1, idx)  # (B, T): the logits of the tokens already present
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, idx, seen)


def filter_logits(logits, top_k=None, top_p=None):
    """
    Sets to -inf every logit outside the top_k largest and outside the nucleus: the
    smallest set of most likely tokens whose probabilities add up to at least top_p
    (Holtzman et al. 2019). The most likely token always survives.
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """
    logits (B, V) of the last position -> next ids (B, 1). With top_k, the draw happens
    among the k largest logits only (a softmax over k values, not over the vocabulary).
    The draw itself is inverse-CDF sampling, the same distribution as torch.multinomial
    at a tenth of its cost over 50,304 tokens: one uniform number u per row, and the first
    token whose cumulative probability passes u.
    """
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    # subtracting the max first: a tiny temperature then gives 0 and -huge, never inf - inf = nan
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted: the candidates
    logits = filter_logits(logits, None, top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V) non-decreasing
    u = torch.rand((cdf.size(0), 1), device=cdf.device, generator=generator) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True)  # tokens with no probability cover no interval
    # u rounded up to the total: take the last token that has probability
    choice = torch.minimum(choice, torch.searchsorted(cdf, cdf[:, -1:].contiguous()))
    return choice if ids is None else ids.gather(-1, choice)


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
        {"params": [p for _, p in named if p.dim() >= 2 and id(p) not in with_muon], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:  # fused: one kernel for all parameters, where this torch has it for the device
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)]
    except (RuntimeError, TypeError):
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)]
    if hidden:
        optimizers.append(torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers
