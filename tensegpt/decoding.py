"""
Ways of decoding beneath sample.py's story, beside model.py's sampling step: beam search,
and a chat model's answer (up to <|end|>).
"""

import torch


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
def answer(model, tokenizer, messages, max_new_tokens=60, stream=None, **sampling):
    """The assistant's next turn after messages, up to <|end|> (greedy unless sampling says otherwise)."""
    ids = tokenizer.prompt(messages)[-model.config.block_size :]
    idx = torch.tensor([ids], device=model.wte.weight.device)
    new = []
    for step in model.generate_stream(idx, max_new_tokens, stop_token=tokenizer.end, **sampling):
        token = int(step)
        if token == tokenizer.end:
            break
        new.append(token)
        if stream is not None:
            stream(tokenizer.decode(new))
    return tokenizer.decode(new)
