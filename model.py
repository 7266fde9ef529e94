"""
The whole GPT in one file, in the order data flows through it:

    token ids -> token embedding + positional encoding -> n_layer x Block -> LayerNorm -> logits
    Block: x + attention(LayerNorm(x)), then x + feed_forward(LayerNorm(x))   (pre-LN, GPT-2)

References: "Attention Is All You Need" (Vaswani et al. 2017) for the transformer and the
sinusoidal positions; GPT-2 (Radford et al. 2019) for pre-LayerNorm, learned positions,
tied embeddings and the scaled initialisation; nanoGPT for the shape of this file.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


CHUNKED_LOSS_MIN_VOCAB = 2048  # from this vocabulary size up, training uses LinearCrossEntropy
CHUNK_ELEMENTS = 3 << 20  # logits per chunk: 12 MB in float32, about what stays in a CPU's cache


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 (faster matmuls)
    block_size: int = 256  # the longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 0  # hidden size of the feed-forward network; 0 means 4 * n_embd
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers and LayerNorms (GPT-2: True)
    pos_encoding: str = "learned"  # 'learned' (GPT-2) or 'sinusoidal' (Vaswani et al.)
    activation: str = "gelu"  # 'gelu' (GPT-2's tanh approximation) or 'relu' (Vaswani et al.)

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd


def check_config(config):
    """The ways a config can be impossible, each as a message naming the key; [] when fine."""
    problems = []
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff"):
        if getattr(config, key) <= 0:
            problems.append(f"{key} must be positive, got {getattr(config, key)}")
    if config.n_head > 0 and config.n_embd % config.n_head:
        problems.append(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    if config.pos_encoding not in ("learned", "sinusoidal"):
        problems.append(f"pos_encoding must be 'learned' or 'sinusoidal', got {config.pos_encoding!r}")
    if config.activation not in ("gelu", "relu"):
        problems.append(f"activation must be 'gelu' or 'relu', got {config.activation!r}")
    return problems


def sinusoidal_positions(block_size, n_embd):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): section 3.5 of the paper."""
    position = torch.arange(block_size, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    frequency = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
    pe = torch.zeros(block_size, n_embd)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)[:, : n_embd // 2]
    return pe  # (T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.keep_weights = False  # True: the explicit path, which keeps its (B, n_head, T, T) weights

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # KV cache: keys and values of earlier positions never change (causal), so
            # store them once and attend the new queries to all of them.
            k_cache, v_cache = cache  # (B, n_head, block_size, head_size)
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
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
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        h = self.c_fc(x)
        h = F.relu(h) if self.activation == "relu" else F.gelu(h, approximate="tanh")  # tanh: GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x, cache=None, pos=0):
        # pre-LN: normalise the input of each sublayer, keep the residual path an identity
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
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("wpe_table", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # The output layer shares its weight with the token embedding (weight tying,
        # Press & Wolf 2017): fewer parameters, and it trains better at this size.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

        self.grad_checkpointing = False  # train.py's --grad_checkpointing
        # Training computes the output layer and the loss in chunks of rows where that is
        # faster: with a large vocabulary (measured on a 2-core CPU: 1.5x at 50,304 rows, 1.3x at
        # 2,048, but 0.7x at 1,152, where one plain matmul is cheaper than the loop).
        self.chunked_loss = config.vocab_size >= CHUNKED_LOSS_MIN_VOCAB
        self.apply(self._init_weights)
        # GPT-2: each residual branch adds to the stream, so scale the projections that
        # write into it by 1/sqrt(2 * n_layer) to keep the stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count (the tied output layer counted once). non_embedding leaves out positions."""
        n = sum(p.numel() for p in self.parameters())
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
        else:
            # the paper scales embeddings by sqrt(d_model) so the fixed sinusoids don't drown them
            x = x * math.sqrt(self.config.n_embd) + self.wpe_table[pos : pos + T]
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
        """One (keys, values) pair per layer, each (B, n_head, block_size, head_size)."""
        c = self.config
        p = self.wte.weight
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
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


def configure_optimizer(model, learning_rate, weight_decay, betas):
    """
    AdamW with weight decay on matrices (Linear weights, embeddings) only: decaying
    biases and LayerNorm gains just pulls them away from their useful values.
    fused (one kernel for all parameters) where this torch has it for the device.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # fused is not built for this device / dtype
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)
