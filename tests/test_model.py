import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_explicit_attention_is_the_fused_one

from model import GPT, GPTConfig, filter_logits, sample_next
from tensegpt.optim import configure_optimizers
from tensegpt.sample_setup import attention_weights


def tiny_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32), **overrides})


@pytest.mark.parametrize("pos_encoding,activation", [("learned", "gelu"), ("sinusoidal", "relu"), ("rotary", "swiglu")])
def test_causal_later_tokens_never_change_earlier_logits(pos_encoding, activation):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pos_encoding, activation=activation, bias=True)).eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 64, (2, 5))
    logits_a, _ = model(idx, idx)
    logits_b, _ = model(changed, changed)
    assert torch.allclose(logits_a[:, :7], logits_b[:, :7], atol=1e-6)
    assert not torch.allclose(logits_a[:, 7:], logits_b[:, 7:])


def test_loss_at_init_is_about_log_vocab_size():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=512))
    idx = torch.randint(0, 512, (8, 16))
    _, loss = model(idx, torch.randint(0, 512, (8, 16)))
    assert abs(loss.item() - math.log(512)) < 0.1


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    [optimizer] = configure_optimizers(model, 3e-3, 0.0, (0.9, 0.99))
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_output_layer_is_tied_and_residual_projections_are_scaled():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=64))
    assert model.lm_head.weight is model.wte.weight
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    # the tied matrix counts once
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_kv_cache_generation_equals_full_recompute(pos_encoding):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pos_encoding)).eval()
    prompt = torch.randint(0, 64, (2, 5))
    # 30 new tokens: the last 19 run past block_size 16, where the window slides
    cached = model.generate(prompt, 30, greedy=True, use_cache=True)
    full = model.generate(prompt, 30, greedy=True, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, full)
    # and sampled tokens agree too, given the same generator state
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(
        prompt, 20, temperature=1.0, top_k=10, use_cache=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)


def test_generation_stops_at_stop_token():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 64, (1, 3))
    first = model.generate(prompt, 1, greedy=True)[0, -1].item()
    out = model.generate(prompt, 10, greedy=True, stop_token=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=3)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], torch.tensor([5.0, 3.0, 4.0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    # 0.5 alone < 0.7; 0.5 + 0.3 = 0.8 >= 0.7: keep those two
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, True, False]]
    # 0.5 + 0.3 + 0.15 = 0.95 reaches 0.9 exactly with three
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).tolist() == [[False, True, True, True]]
    # a tiny p keeps the most likely token only
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_optimizer_decays_matrices_only():
    model = GPT(tiny_config(bias=True))
    [optimizer] = configure_optimizers(model, 1e-3, 0.1, (0.9, 0.99))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_big_vocabulary_trains_on_the_chunked_loss_with_the_same_loss_and_gradients(dtype, monkeypatch):
    import model as model_py

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(0, 4096, (4, 16)), torch.randint(0, 4096, (4, 16))
    y[0, :10] = model_py.IGNORE  # a chat prompt's tokens: not counted either way
    results = []
    for limit in (0, model_py.LOGITS_MAX_BYTES):
        monkeypatch.setattr(model_py, "LOGITS_MAX_BYTES", limit)
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits, loss = model(x, y)
        loss.backward()
        assert (logits is None) == (limit == 0)  # the chunked path never builds the (B, T, V) logits
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        every = model(x, logits_at=torch.arange(64))[0]
        plain = F.cross_entropy(every.float(), y.flatten(), ignore_index=model_py.IGNORE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(results[0][0] - results[1][0]) < tol and abs(results[1][0] - plain.item()) < tol
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=tol, atol=tol * 1e-2)
    # GPT-2's vocabulary at config/small.py's shape chunks; nanoGPT's shape and a compact vocabulary do not
    assert 32 * 128 * 50304 * 4 > model_py.LOGITS_MAX_BYTES >= max(12 * 64 * 50304 * 4, 32 * 128 * 1152 * 4)


def test_sampling_draws_from_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]])
    generator = torch.Generator().manual_seed(0)
    n = 40000
    draws = torch.cat([sample_next(logits.expand(1000, -1), 1.0, generator=generator) for _ in range(n // 1000)])
    counts = torch.bincount(draws[:, 0], minlength=6).double() / n
    expected = torch.softmax(logits[0].double(), dim=0)
    assert counts[4] == 0  # no probability, never drawn
    assert (counts - expected).abs().max() < 0.01  # ~4 standard errors at these probabilities
    # top_k: only the k largest, in proportion to their probabilities
    draws = torch.cat([sample_next(logits.expand(1000, -1), 1.0, top_k=2, generator=generator) for _ in range(20)])
    counts = torch.bincount(draws[:, 0], minlength=6).double() / 20000
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert abs(counts[0] - torch.sigmoid(torch.tensor(1.0)).item()) < 0.015
    # top_p=0.7 keeps {0, 1} (0.60 + 0.22 reaches it); together with top_k=1 only token 0
    assert set(sample_next(logits.expand(2000, -1), 1.0, top_p=0.7, generator=generator)[:, 0].tolist()) == {
        0,
        1,
    }
    assert set(sample_next(logits.expand(50, -1), 1.0, top_k=1, top_p=0.7, generator=generator)[:, 0].tolist()) == {0}


def test_a_tiny_temperature_is_the_most_likely_token_not_nan():
    logits = torch.tensor([[30.0, 31.0, -5.0], [1.0, 0.0, 0.5]])
    for temperature in (1e-30, 1e-45):
        assert sample_next(logits, temperature).tolist() == [[1], [0]]
        assert sample_next(logits, temperature, top_k=2, top_p=0.5).tolist() == [[1], [0]]


@pytest.mark.parametrize("n_tokens,block_size", [(50, 16), (17, 16), (9, 16), (40, 7)])
def test_total_nats_scores_every_token_once(n_tokens, block_size):
    from tensegpt.loss_eval import total_nats

    model = GPT(tiny_config(block_size=block_size, vocab_size=64))
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0: uniform over the 64 ids, ln 64 nats a token
    tokens = np.arange(n_tokens) % 64
    nats, counted = total_nats(model, tokens, block_size, batch_size=3)
    assert counted == n_tokens - 1 and math.isclose(nats, counted * math.log(64), rel_tol=1e-5)
    assert model.training  # left as it was found


def test_total_nats_equals_the_loss_of_one_window_when_the_split_fits():
    from tensegpt.loss_eval import total_nats

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    tokens = torch.randint(0, 64, (17,))
    nats, counted = total_nats(model, tokens.numpy(), 16)
    _, loss = model(tokens[None, :-1], tokens[None, 1:])
    assert counted == 16 and math.isclose(nats, 16 * loss.item(), rel_tol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_attention_weights_reproduce_the_fast_path(pos_encoding):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pos_encoding)).eval()
    idx = torch.randint(0, 64, (1, 12))
    weights = attention_weights(model, idx)
    assert len(weights) == 2 and weights[0].shape == (2, 12, 12)
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, 12)) and weights[0].triu(1).abs().max() == 0  # causal rows
    assert_explicit_attention_is_the_fused_one(model, idx)


def test_model_py_alone_in_an_empty_folder_builds_trains_and_generates(tmp_path):
    """The fork promise: model.py needs nothing of this project; nothing else of it is importable there."""
    import shutil
    import subprocess
    import sys

    from helpers import ROOT

    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path / "model.py")
    program = """
import torch
from model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randint(0, 64, (4, 16))
losses = []
for _ in range(3):
    logits, loss = model(x[:, :-1], x[:, 1:])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
assert logits.shape == (4, 15, 64) and losses[-1] < losses[0], losses
out = model.eval().generate(x[:1, :3], 5, greedy=True)
assert out.shape == (1, 8)
import sys
assert not any(name in sys.modules for name in ("tensegpt", "train")), "model.py imports the project"
print("ok", losses)
"""
    (tmp_path / "fork.py").write_text(program)
    # -E: no PYTHONPATH; the script's folder (model.py alone) is all of the project on the path
    result = subprocess.run([sys.executable, "-E", "fork.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr
