"""
What a stage checks of model.py before it relies on it (checkpoint.load_model runs it for
sample.py, eval.py and serve.py): that the ways the stages run the model's forward give the
logits of the plain one, as model.py's contract promises. A fork whose attention ignores the
cache or the mask it is handed would otherwise sample, score and serve other numbers without
a word; here it stops with a line that says which way differs and what the contract asks.

    the KV cache   a prompt, then one token at a time after it (sample.py, eval.py)
    the engine     sequences of other lengths decoded together, prompts packed into one row
                   beside them (serve.py, eval.py's exact match)
"""

import torch

from tensegpt.common import UserError

# log-probabilities may differ by float32 rounding between the layouts; a broken fork's by far more
TOLERANCE = 1e-3
CONTRACT = "model.py's contract (at its top): attention stores keys through cache.update(input_pos, k, v) and sees "


def check_model(model):
    """Both checks, on random tokens; a UserError naming the first that fails. model: in eval mode."""
    check_cache(model)
    check_engine(model)


def probe(model, T, seed):
    vocab = model.config.vocab_size
    return torch.randint(vocab, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def log_probs_alone(model, tokens):
    """The log-probabilities (T, V) after each of tokens, from one plain forward pass: what every layout must give."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokens], device=device)
    logits = model(idx, logits_at=torch.arange(len(tokens), device=device))[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.inference_mode()
def check_cache(model):
    T = min(12, model.config.block_size)
    tokens, start = probe(model, T, seed=0), T // 2
    alone = log_probs_alone(model, tokens)
    device = next(model.parameters()).device
    caches = model.new_caches(1)
    # the prompt's first half in one pass, then each later token alone at its own position
    steps = [(tokens[:start], 0, start - 1)] + [([tokens[pos]], pos, pos) for pos in range(start, T)]
    worst = 0.0
    for fed, input_pos, row in steps:
        logits = model(torch.tensor([fed], device=device), caches=caches, input_pos=input_pos)[0][0, -1]
        worst = max(worst, float((torch.log_softmax(logits.float(), dim=-1).cpu() - alone[row]).abs().max()))
    if not worst <= TOLERANCE:
        raise UserError(
            f"model.py: one token after a KV cache gets other log-probabilities than the whole sequence run at once "
            f"(off by up to {worst:.3g}): {CONTRACT}the mask it is given"
        )


@torch.inference_mode()
def check_engine(model):
    from tensegpt.engine import Engine
    from tensegpt.sequence import Sampling, Sequence

    block_size = model.config.block_size
    lengths = [n for n in (3, 7, 5) if n + 4 <= block_size] or [1]
    prompts = [probe(model, n, seed=1 + i) for i, n in enumerate(lengths)]
    greedy = Sampling(temperature=0)
    sequences = [Sequence(p, max_tokens=min(4, block_size - len(p)), sampling=greedy, logprobs=1) for p in prompts]
    engine = Engine(model, max_batch=len(sequences), max_queue=len(sequences), prefill_chunk=4)
    # one arrives while the first decodes: steps of rows, and packed steps of prompts beside a decoding row
    engine.submit(sequences[0])
    engine.step()
    engine.submit(*sequences[1:])
    while engine.pending():
        engine.step()
    worst = 0.0
    for s in sequences:
        alone = log_probs_alone(model, s.prompt + s.tokens)
        for i, (token, (logprob, _)) in enumerate(zip(s.tokens, s.scores)):
            worst = max(worst, abs(logprob - float(alone[len(s.prompt) + i - 1, token])))
    if not worst <= TOLERANCE:
        raise UserError(
            f"model.py: sequences decoded together (serve.py's engine) get other log-probabilities than each alone "
            f"(off by up to {worst:.3g}): {CONTRACT}only the keys the mask it is given allows, at the positions "
            "input_pos names (each row's own)"
        )
