"""Decoding fast: the decode-time weights (--precision) and speculative decoding (--draft)."""

import copy

import pytest
import torch
from helpers import fails, run_script

import sample
from model import GPT, GPTConfig, next_token_probs
from tensegpt.common import UserError
from tensegpt.decode_weights import Int8Linear, TransposedLinear, for_decoding, weight_bytes_per_token
from tensegpt.decoding import accept_drafts, speculative_stream
from tensegpt.sample_setup import check_options


def gpt(seed, sharp=1.0, **overrides):
    """A small random GPT; sharp > 1 scales the output layer so its distributions are far from uniform."""
    torch.manual_seed(seed)
    config = dict(vocab_size=12, block_size=24, n_layer=2, n_head=2, n_embd=32, bias=True)
    model = GPT(GPTConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        model.wte.weight.mul_(sharp)
    return model


# ----------------------------------------------------------------------------- decode-time weights


@pytest.mark.parametrize("layout", ["as_is", "transposed", "fastest"])
def test_float32_decoding_keeps_the_logits_and_the_greedy_text(layout):
    model = gpt(0, sharp=20.0, vocab_size=200, n_embd=48, block_size=64)
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    expected_logits, _ = model(idx)
    expected = model.generate(idx, 40, greedy=True)
    fast = for_decoding(copy.deepcopy(model), "float32", layout)
    if layout != "fastest":  # each matrix in the layout asked for
        wanted = TransposedLinear if layout == "transposed" else torch.nn.Linear
        assert isinstance(fast.lm_head, wanted) and isinstance(fast.blocks[0].mlp.c_fc, wanted)
    torch.testing.assert_close(fast(idx)[0], expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.generate(idx, 40, greedy=True), expected)


@pytest.mark.parametrize("faster", ["as_is", "transposed"])
def test_fastest_layout_keeps_the_faster_one_and_the_tied_output_layer(faster, monkeypatch):
    """Whichever layout times faster is kept; going back to (out, in) keeps the output layer tied."""
    import tensegpt.decode_weights as decode_weights

    def seconds(model):  # the layout `faster` takes 1 s, the other 2
        transposed = isinstance(model.blocks[0].mlp.c_fc, TransposedLinear)
        return 1.0 if transposed == (faster == "transposed") else 2.0

    monkeypatch.setattr(decode_weights, "one_token_seconds", seconds)
    model = gpt(2, vocab_size=100, n_embd=32)
    idx = torch.tensor([[5, 7, 9]])
    fast = for_decoding(copy.deepcopy(model), "float32", "fastest")
    wanted = TransposedLinear if faster == "transposed" else torch.nn.Linear
    assert all(isinstance(b.attn.c_attn, wanted) and isinstance(b.mlp.c_proj, wanted) for b in fast.blocks)
    assert isinstance(fast.lm_head, wanted)
    assert (getattr(fast.lm_head, "weight", None) is fast.wte.weight) == (faster == "as_is")  # tied again
    torch.testing.assert_close(fast(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout must be"):
        for_decoding(copy.deepcopy(model), "float32", "sideways")


def test_bfloat16_and_int8_stay_close_to_float32():
    model = gpt(1, sharp=10.0, vocab_size=300, n_embd=64, block_size=64)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(model(idx, idx)[0], dim=-1)
    for precision, tolerance in (("bfloat16", 0.02), ("int8", 0.03)):
        fast = for_decoding(copy.deepcopy(model), precision)
        assert fast.wte.weight.dtype == torch.bfloat16
        assert isinstance(fast.blocks[1].attn.c_attn, Int8Linear) == (precision == "int8")
        fast_probs = torch.softmax(fast(idx, idx)[0].float(), dim=-1)
        assert (fast_probs - probs).abs().sum(-1).max() / 2 < tolerance  # total variation per position


def test_int8_weights_are_the_rounded_weights_times_their_row_scale():
    linear = torch.nn.Linear(64, 16, bias=True)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    dequantized = q.weight.float() * q.scale.float()[:, None]
    assert (dequantized - linear.weight).abs().max() <= q.scale.float().max() * 0.51  # half a step, in bf16
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x).float(), linear(x), rtol=0.05, atol=0.05)


def test_bytes_per_token_count_every_matrix_once_and_one_embedding_row():
    model = gpt(2, vocab_size=100, n_embd=32, block_size=16)
    c = model.config
    matrices = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe")))
    tied = c.vocab_size * c.n_embd  # the output layer reads the whole embedding table
    assert weight_bytes_per_token(model) == 4 * (matrices + tied + c.n_embd)
    int8 = for_decoding(copy.deepcopy(model), "int8")
    kv = 2 * c.n_layer * c.n_embd * 10 * 2  # keys and values of 10 positions in bfloat16
    assert weight_bytes_per_token(int8, context=10) < weight_bytes_per_token(model) / 2
    assert weight_bytes_per_token(int8, context=10) - weight_bytes_per_token(int8) == kv


# ----------------------------------------------------------------------------- speculative decoding


def test_queries_after_a_cache_see_exactly_the_keys_up_to_their_own_position():
    model = gpt(3, vocab_size=50, block_size=32)
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(1))
    full = model(idx, logits_at=torch.arange(20))[0]  # (20, V)
    caches = model.new_caches(1)
    model(idx[:, :12], caches=caches)
    after = model(idx[:, 12:], caches=caches, input_pos=12, logits_at=torch.arange(8))[0]  # 8 new positions at once
    torch.testing.assert_close(after, full[12:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_speculative_text_is_the_models_own(draft_tokens):
    model = gpt(4, sharp=20.0, vocab_size=40, block_size=24)
    idx = torch.tensor([[1, 2, 3]])
    expected = model.generate(idx, 40, greedy=True)[0, 3:].tolist()  # passes the 24-token window
    for draft in (gpt(5, sharp=20.0, vocab_size=40, block_size=8), model):  # a poor draft, a perfect one
        stats = {}
        stream = speculative_stream(model, draft, idx, 40, draft_tokens, greedy=True, stats=stats)
        assert [int(t) for t in stream] == expected
        if draft is model:  # it agrees every time: k + 1 tokens per pass while the window allows
            assert stats["accepted"] == stats["proposed"] > 0


def test_a_tiny_temperature_with_a_draft_is_the_greedy_text_not_nan():
    model, draft = gpt(9, sharp=20.0, vocab_size=40), gpt(10, sharp=20.0, vocab_size=40)
    idx = torch.tensor([[3]])
    expected = model.generate(idx, 12, greedy=True)[0, 1:].tolist()
    assert [int(t) for t in speculative_stream(model, draft, idx, 12, 3, temperature=1e-30)] == expected


def test_speculative_stops_at_the_stop_token():
    model = gpt(6, sharp=20.0, vocab_size=40)
    idx = torch.tensor([[7]])
    plain = model.generate(idx, 20, greedy=True)[0, 1:].tolist()
    stop = plain[5]
    spec = [int(t) for t in speculative_stream(model, model, idx, 20, 4, greedy=True, stop_token=stop)]
    assert spec == plain[: plain.index(stop) + 1]


def test_the_accept_reject_rule_emits_the_big_models_distribution():
    # a 'model' whose distribution at position j is p[j] whatever came before; the draft's is q[j]
    gen = torch.Generator().manual_seed(0)
    V, k, trials = 5, 3, 20000
    p = torch.softmax(3 * torch.randn(k + 1, V, generator=gen), dim=-1)
    q = torch.softmax(3 * torch.randn(k, V, generator=gen), dim=-1)
    q[0, 2] = 0.0  # a token the draft never proposes still comes out as often as p says
    q[0] /= q[0].sum()
    counts = torch.zeros(k + 1, V)
    reached = torch.zeros(k + 1)
    for _ in range(trials):
        drafted = torch.cat([torch.multinomial(q[j], 1, generator=gen) for j in range(k)])
        emitted = accept_drafts(drafted, q, p, generator=gen)
        for j, token in enumerate(emitted):
            counts[j, token] += 1
            reached[j] += 1
    first = counts[0] / trials
    assert (first - p[0]).abs().max() < 0.015  # the first token: exactly p's first row
    for j in range(1, k + 1):  # a later one, where the round got that far: p's row j
        if reached[j] > 2000:
            assert (counts[j] / reached[j] - p[j]).abs().max() < 0.035


def test_speculative_sampling_keeps_the_models_distribution_end_to_end():
    model = gpt(7, sharp=8.0, vocab_size=6, n_embd=16)
    draft = gpt(8, sharp=8.0, vocab_size=6, n_embd=16)
    idx = torch.tensor([[0]])
    with torch.no_grad():  # the exact distribution of the first two new tokens
        first = next_token_probs(model(idx)[0][0])[0]  # (V,)
        pairs = torch.cat((torch.zeros(6, 1, dtype=torch.long), torch.arange(6)[:, None]), dim=1)
        second = next_token_probs(model(pairs)[0][:, 0])  # (V, V): row a is p(. | a)
    exact = first[:, None] * second  # (V, V)
    gen = torch.Generator().manual_seed(0)
    counts, trials = torch.zeros(6, 6), 4000
    for _ in range(trials):
        a, b = [int(t) for t in speculative_stream(model, draft, idx, 2, 3, generator=gen)]
        counts[a, b] += 1
    assert (counts / trials - exact).abs().sum() / 2 < 0.06  # total variation over the 36 pairs


# ----------------------------------------------------------------------------- the command line


def test_sample_precisions_and_a_draft_from_the_command_line(tiny_run):
    plain = run_script("sample.py", "--ckpt=out/trained.pth", "--greedy", "--start=The baby", cwd=tiny_run)
    out = run_script("sample.py", "--ckpt=out/trained.pth", "--precision=int8", "--start=The baby", cwd=tiny_run)
    assert out.stdout.startswith("The baby")
    # the model as its own draft: every drafted token is kept, and the greedy text is the model's
    spec = run_script(
        "sample.py", "--ckpt=out/trained.pth", "--greedy", "--start=The baby", "--draft=out/trained.pth",
        "--draft_tokens=3", cwd=tiny_run,
    )  # fmt: skip
    assert spec.stdout == plain.stdout
    assert "speculative decoding: the model kept" in spec.stderr and "(100%)" in spec.stderr
    # in the interactive loop a repetition penalty is said to leave the draft aside
    talk = run_script(
        "sample.py", "--ckpt=out/trained.pth", "--interactive", "--draft=out/trained.pth", cwd=tiny_run,
        input="/repetition_penalty 1.3\nThe baby\n/quit\n",
    )  # fmt: skip
    assert "note: a repetition penalty changes the model's distribution, which the draft keeps" in talk.stdout


def test_bad_decoding_options_are_one_line(tiny_run, trained_run):
    ckpt = "--ckpt=out/trained.pth"
    assert "--precision must be one of" in fails("sample.py", ckpt, "--precision=int4", cwd=tiny_run)
    assert "no draft checkpoint at nope.pth" in fails("sample.py", ckpt, "--draft=nope.pth", cwd=tiny_run)
    # a draft prepared from another text: other compact token ids
    other = f"--draft={trained_run / 'out' / 'trained.pth'}"
    assert "was trained on other tokens than the model" in fails("sample.py", ckpt, other, cwd=tiny_run)
    for change, message in (
        ({"beam": 3}, "does not combine with --beam"),
        ({"repetition_penalty": 1.3}, "which --repetition_penalty changes"),
        ({"draft_tokens": 0}, "--draft_tokens must be a whole number >= 1"),
        ({"draft_precision": "fp8"}, "--draft_precision must be one of float32, bfloat16, int8"),
    ):
        with pytest.raises(UserError, match=message):
            check_options({**sample.DEFAULTS, "draft": "out/trained.pth", **change})


def test_bench_measures_each_precision_against_transformers_and_the_bound(capsys):
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from tensegpt.decode_bench import bench_decoding, print_decoding

    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=64)  # GPT-2's vocabulary
    val = (np.arange(200) * 97 % 50257).astype(np.uint16)
    r = bench_decoding(8, val, "cpu", config)
    assert r["bandwidth_gb_per_s"] > 0 and r["transformers_float32"] > 0
    for precision in ("float32", "bfloat16", "int8"):
        row = r[precision]
        assert row["vs_transformers"] == row["tokens_per_sec"] / r["transformers_float32"]
        assert row["share_of_bound"] == pytest.approx(row["tokens_per_sec"] / row["bound_tokens_per_sec"])
        assert abs(row["bits_per_byte_vs_float32"]) < 0.01
    assert r["float32"]["greedy_text_unchanged"] and r["float32"]["bits_per_byte_vs_float32"] == pytest.approx(
        0, abs=1e-6
    )
    assert r["int8"]["mb_per_token"] < r["bfloat16"]["mb_per_token"] < r["float32"]["mb_per_token"]
    for spec in r["float32"]["speculative_self_draft"] + r["int8"]["speculative_self_draft"]:  # 2 of 3 layers
        assert 0 <= spec["accepted"] <= 1 and spec["speedup"] > 0
    print_decoding({"decoding": r})  # bench.py's table: a row per precision, a line per speculative run
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["float32", "bfloat16", "int8"]
    assert sum(line.startswith("speculative decoding (greedy") for line in table) == 4
