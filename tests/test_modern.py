"""The modern-block switches of model.py (rotary, RMSNorm, SwiGLU, squared ReLU, GQA, QK-norm) and Muon."""

import os

import pytest
import torch
from helpers import ROOT, assert_explicit_attention_is_the_fused_one, losses, run_script

from model import GPT, GPTConfig, positions, rotary, rotate
from tensegpt.optim import configure_optimizers

SWITCHES = {
    "rotary": {"pos_encoding": "rotary"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"activation": "swiglu"},
    "relu2": {"activation": "relu2"},
    "gqa": {"n_kv_head": 1},
    "qk_norm": {"qk_norm": True},
    "all": {
        "pos_encoding": "rotary",
        "norm": "rmsnorm",
        "activation": "swiglu",
        "n_kv_head": 2,
        "qk_norm": True,
    },
}


def config(**overrides):
    return GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), **overrides})


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_trains_and_its_kv_cache_equals_a_full_recompute(switch):
    torch.manual_seed(0)
    model = GPT(config(**SWITCHES[switch]))
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 64)
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters()
    )
    model.eval()
    prompt = idx[:2, :5]
    # 30 new tokens: past block_size 16 the window slides and the cache is rebuilt
    assert torch.equal(
        model.generate(prompt, 30, greedy=True), model.generate(prompt, 30, greedy=True, use_cache=False)
    )
    # the attention written out (sample.py --attention draws its weights) is the fused kernel's
    assert_explicit_attention_is_the_fused_one(model, idx[:1])


def test_rotary_attention_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = (
        torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8),
        torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8),
    )  # the same vectors everywhere
    rope = rotary(positions(0, 12), 8)
    scores = rotate(q, rope) @ rotate(k, rope).transpose(-2, -1)  # (1, 1, 12, 12)
    for shift in (1, 5):
        assert torch.allclose(scores[0, 0, shift:, shift:], scores[0, 0, :-shift, :-shift], atol=1e-5)
    assert not torch.allclose(scores[0, 0, 0, 1], scores[0, 0, 0, 2])  # but they do depend on it
    # starting at position p is the same as being p places into a longer sequence (the KV cache relies on it)
    assert torch.allclose(rotate(q[:, :, :5], rotary(positions(7, 5), 8)), rotate(q, rope)[:, :, 7:12], atol=1e-6)


def test_grouped_query_attention_is_multi_head_attention_with_shared_keys_and_values():
    torch.manual_seed(0)
    gqa = GPT(config(n_kv_head=2)).eval()
    mha = GPT(config()).eval()
    state = gqa.state_dict()
    C, hs = 32, 8
    for i in range(2):
        w = state[f"blocks.{i}.attn.c_attn.weight"]  # (C + 2 * 2 * hs, C): q, then 2 key heads, then 2 value heads
        q, k, v = w[:C], w[C : C + 2 * hs], w[C + 2 * hs :]
        # each key/value head serves 2 query heads: repeat it for each of them
        repeat = lambda t: t.view(2, hs, C).repeat_interleave(2, dim=0).reshape(4 * hs, C)
        state[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5)
    # n_kv_head == n_head is plain multi-head attention: the same parameters, the same numbers
    torch.manual_seed(0)
    same = GPT(config(n_kv_head=4)).eval()
    torch.manual_seed(0)
    assert torch.equal(same(idx, idx)[0], GPT(config()).eval()(idx, idx)[0])
    # and the KV cache holds only the key/value heads
    assert gqa.new_caches(1)[0].k.shape == (1, 2, 16, 8) and mha.new_caches(1)[0].k.shape == (1, 4, 16, 8)


def test_swiglu_keeps_the_parameter_count_of_the_gelu_feed_forward():
    gelu, swiglu = GPT(config(n_embd=128)), GPT(config(n_embd=128, activation="swiglu"))
    assert swiglu.config.d_ff == 352  # 8/3 * 128 = 341.3, rounded up to a multiple of 32
    assert abs(swiglu.num_params() / gelu.num_params() - 1) < 0.03


@pytest.mark.parametrize(
    "overrides,problem",
    [
        ({"n_kv_head": 3}, "n_kv_head (3) must divide n_head (4)"),
        (
            {"pos_encoding": "rotary", "n_embd": 36, "n_head": 4, "n_kv_head": 4},
            "the head size n_embd / n_head (9) must be even",
        ),
        ({"norm": "batchnorm"}, "norm must be one of layernorm, rmsnorm; got 'batchnorm'"),
    ],
)
def test_impossible_switches_are_named(overrides, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        GPT(config(**overrides))


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = GPT(config())
    adamw, muon = configure_optimizers(model, 1e-2, 0.1, (0.9, 0.99), kind="muon")
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert {name for name, p in named.items() if id(p) in in_muon} == {
        name for name, p in named.items() if name.startswith("blocks.") and p.dim() == 2
    }
    before = {name: p.detach().clone() for name, p in named.items()}
    idx = torch.randint(0, 64, (4, 16))
    model(idx, idx)[1].backward()
    adamw.step()
    muon.step()
    assert all(not torch.equal(before[name], p) for name, p in named.items() if p.dim() == 2)


def test_stacked_muon_steps_as_torch_optim_muon_does():
    # matrices of one shape orthogonalised together, others alone: the same numbers and state as torch.optim.Muon
    from tensegpt.optim import StackedMuon

    torch.manual_seed(0)
    shapes = [(24, 8), (8, 8), (24, 8), (8, 40), (8, 8), (24, 8)]
    mine = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    settings = dict(lr=3e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    stacked, reference = StackedMuon(mine, **settings), torch.optim.Muon(theirs, **settings)
    start = [p.detach().clone() for p in mine]
    for _ in range(3):
        for a, b in zip(mine, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        stacked.step()
        reference.step()
    for a, b, before in zip(mine, theirs, start, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.allclose(a, before)
    ours, torchs = stacked.state_dict(), reference.state_dict()
    assert ours["state"].keys() == torchs["state"].keys() and ours["param_groups"] == torchs["param_groups"]
    for i, state in torchs["state"].items():
        torch.testing.assert_close(ours["state"][i]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_modern_config_with_muon_resumes_exactly(tiny_run, tmp_path):
    common = [
        os.path.join(ROOT, "config", "tiny.py"),
        os.path.join(ROOT, "config", "modern.py"),
        f"--data_dir={tiny_run / 'data'}",
        "--log_interval=1",
        "--lr_decay_iters=12",
        "--eval_interval=6",
        "--dropout=0.1",
    ]
    out = run_script("train.py", *common, "--out_dir=straight", "--max_iters=12", cwd=tmp_path)
    assert "out-modern" not in out.stdout and "straight/trained.pth" in out.stdout
    run_script("train.py", *common, "--out_dir=split", "--max_iters=6", cwd=tmp_path)
    run_script("train.py", *common, "--out_dir=split", "--max_iters=12", "--init_from=resume", cwd=tmp_path)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert a["model_config"]["pos_encoding"] == "rotary" and a["train_config"]["optimizer"] == "muon"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any("momentum_buffer" in s for s in a["optimizer"]["state"].values())  # Muon's state is in the checkpoint


def test_muon_without_torch_optim_muon_is_a_clear_error(monkeypatch):
    from tensegpt import run_setup
    from tensegpt.common import UserError
    from train import DEFAULTS

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"--optimizer=muon needs torch.optim.Muon \(torch 2.9 or later"):
        run_setup.check_layout({**DEFAULTS, "optimizer": "muon"}, 1, "float32")
