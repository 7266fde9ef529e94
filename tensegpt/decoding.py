"""
Ways of decoding beneath sample.py's story, beside model.py's sampling step: beam search,
a chat model's answer (up to <|end|>; many at once for eval.py), and speculative decoding
with a draft model.
"""

import torch

from model import draw, next_token_probs


@torch.no_grad()
def beam_search(model, idx, beams, max_new_tokens, stop_token=None, length_penalty=1.0):
    """
    The continuation of idx (1, T) with the highest length-normalised log-probability
    found by keeping the `beams` best partial continuations at each step. Returns
    (new token ids, their total log-probability). A continuation ends at stop_token;
    candidates are compared by log-probability / length**length_penalty (Wu et al.
    2016), so that longer ones are not punished just for having more terms.
    """
    block_size = model.config.block_size
    alive = [(idx[0].tolist(), [], 0.0)]  # (context, new tokens, log-probability)
    done = []
    for _ in range(max_new_tokens):
        contexts = torch.tensor([c[-block_size:] for c, _, _ in alive], device=idx.device)  # (beams, T)
        logits, _ = model(contexts)
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
        if len(done) >= beams and normalised(done[0], length_penalty) >= max(
            normalised(c, length_penalty) for c in alive
        ):
            break
    best = max(done + alive, key=lambda c: normalised(c, length_penalty))
    return best[1], best[2]


def normalised(candidate, length_penalty):
    _, new, logprob = candidate
    return logprob / (len(new) ** length_penalty)


@torch.inference_mode()
def answer(model, tokenizer, messages, max_new_tokens=60, stream=None, generate=None, **sampling):
    """
    The assistant's next turn after messages, up to <|end|> (greedy unless sampling says
    otherwise). generate: what makes the tokens, model.generate_stream unless given.
    """
    ids = tokenizer.prompt(messages)[-model.config.block_size :]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    sampling = {"greedy": True, **sampling}  # generate_stream alone would sample at temperature 1
    new = []
    for step in (generate or model.generate_stream)(idx, max_new_tokens, stop_token=tokenizer.end, **sampling):
        token = int(step)
        if token == tokenizer.end:
            break
        new.append(token)
        if stream is not None:
            stream(tokenizer.decode(new))
    return tokenizer.decode(new)


def greedy_answers(model, tokenizer, conversations, max_new_tokens=60, max_batch=16):
    """
    answer() for many conversations at once: each one's next assistant turn, greedily, decoded
    together by serve.py's batching engine (tensegpt/engine.py) in rows of max_batch. The same
    texts as answer() one at a time, in a fraction of the time (eval.py's exact match).
    """
    from tensegpt.engine import Engine
    from tensegpt.sequence import Sampling, Sequence

    engine = Engine(model, max_batch=max_batch, max_queue=len(conversations))
    end, greedy = frozenset({tokenizer.end}), Sampling(temperature=0)
    sequences = [
        Sequence(tokenizer.prompt(messages)[-model.config.block_size :], max_new_tokens, end, greedy)
        for messages in conversations
    ]
    engine.submit(*sequences)
    while engine.pending():
        engine.step()
    return [tokenizer.decode(s.tokens) for s in sequences]


# ----------------------------------------------------------------------------- speculative decoding


class CachedModel:
    """
    A model and its KV cache over one growing sequence (batch 1) that a caller can cut back:
    logits(tokens) runs the model only on the tokens its cache does not hold yet.
    """

    def __init__(self, model):
        self.model, self.caches = model, model.new_caches(1)
        self.start, self.cached = 0, 0  # the cache holds tokens[start : start + cached]

    def logits(self, tokens, last=1):
        """The logits (last, V) after each of the last `last` positions of tokens (1, L)."""
        L, block_size = tokens.size(1), self.model.config.block_size
        start = max(0, L - block_size)  # past the context window only the last block_size tokens count
        if start != self.start:  # the window moved, so did every position: the cache is stale
            self.start, self.cached = start, 0
        cached = min(self.cached, L - start - last)
        new = tokens[:, start + cached :]  # (1, n)
        at = torch.arange(new.size(1) - last, new.size(1), device=new.device)
        logits, _ = self.model(new, caches=self.caches, input_pos=cached, logits_at=at)  # (last, V)
        self.cached = L - start
        return logits

    def keep(self, n):
        """Forget every position past the first n tokens (drafts that were turned down)."""
        self.cached = max(0, min(self.cached, n - self.start))


def accept_drafts(drafted, q, p, greedy=False, generator=None):
    """
    The rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023). drafted (k,)
    tokens came from the draft's distributions q (k, V); p (k + 1, V) are the big model's
    at the same positions and one past them. Draft token x is kept with probability
    min(1, p(x) / q(x)); the first one turned down is replaced by a draw from
    max(0, p - q), renormalised, and if all are kept one more comes from p's last row.
    Each emitted token is then distributed exactly as p: what q gives too often is cut
    back, and the residual adds what q gives too rarely. Greedy: keep the drafts that are
    the big model's argmax. Returns the tokens to emit (between 1 and k + 1).
    """
    out = []
    for i, token in enumerate(drafted.tolist()):
        if greedy:
            best = int(p[i].argmax())
            if token != best:
                return out + [best]
        elif float(torch.rand((), device=p.device, generator=generator)) * q[i, token] >= p[i, token]:
            residual = (p[i] - q[i]).clamp_min(0)
            residual = residual if residual.sum() > 0 else p[i]
            return out + [int(draw(residual[None], generator))]
        out.append(token)
    return out + [int(p[-1].argmax()) if greedy else int(draw(p[-1:], generator))]


@torch.inference_mode()
def speculative_stream(
    model, draft, idx, max_new_tokens, draft_tokens=4, temperature=1.0, top_k=None, top_p=None,
    greedy=False, stop_token=None, generator=None, stats=None,
):  # fmt: skip
    """
    Yields next ids (1, 1) like model.generate_stream, but a small draft model of the same
    tokenizer proposes draft_tokens tokens and the big model checks them all in one forward
    pass: a pass reads the big model's weights once, whatever the number of positions, so
    each kept draft is a token for almost nothing. The text has the big model's distribution
    (greedy: the big model's own text). Past the big model's context window there is
    nothing to check ahead in one window, so it decodes token by token. stats (a dict)
    counts the drafts 'proposed' and 'accepted' and the big model's 'passes'.
    """
    target, proposer = CachedModel(model), CachedModel(draft)
    if greedy:  # only the argmax counts, and it is the logits' own
        probs = lambda logits: logits
    else:
        probs = lambda logits: next_token_probs(logits, temperature, top_k, top_p)
    tokens, made = idx, 0
    while made < max_new_tokens:
        # no more drafts than tokens still wanted or than positions left in the window
        k = max(0, min(draft_tokens, max_new_tokens - made - 1, model.config.block_size - tokens.size(1)))
        sequence, drafted, q = tokens, [], []
        for _ in range(k):
            q.append(probs(proposer.logits(sequence)))  # (1, V)
            drafted.append(q[-1].argmax(-1, keepdim=True) if greedy else draw(q[-1], generator))  # (1, 1)
            sequence = torch.cat((sequence, drafted[-1]), dim=1)
        p = probs(target.logits(sequence, last=k + 1))  # (k + 1, V)
        drafted = torch.cat(drafted, dim=1)[0] if k else torch.zeros(0, dtype=torch.long)
        new = accept_drafts(drafted, torch.cat(q) if k else None, p, greedy, generator)
        for cache in (target, proposer):  # the kept drafts' keys and values stay in the caches
            cache.keep(tokens.size(1) + len(new) - 1)
        if stats is not None:  # what the draft proposed and got kept, and the big model's passes
            for key, n in (("proposed", k), ("accepted", len(new) - 1), ("passes", 1)):
                stats[key] = stats.get(key, 0) + n
        for token in new:
            next_id = torch.tensor([[token]], device=idx.device)
            tokens, made = torch.cat((tokens, next_id), dim=1), made + 1
            yield next_id
            if token == stop_token:
                return
