"""
Randomized tests (hypothesis): whatever a user types or feeds in, the configurator, the
line reader and the tokenizers either work or raise the project's one-line UserError, and
text that prepares comes back unchanged through encode/decode.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prepare
from tensegpt import tokenizer as tok
from tensegpt.common import UserError, one_line, parse_config
from tensegpt.sequence import Sampling
from train import DEFAULTS as TRAIN_DEFAULTS

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = sorted(TRAIN_DEFAULTS) + ["", "seed ", "n_layers", "dtype=", "-"]


def option():
    values = st.one_of(
        st.text(max_size=12),
        st.integers().map(str),
        st.floats(allow_nan=True).map(repr),
        st.sampled_from(["True", "None", "[1,", "(1, 2)", "{}", "1e999", "'x'", "10**20", "b'x'"]),
    )
    return st.one_of(
        st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS), values),
        st.builds(lambda k: f"--{k}", st.sampled_from(KEYS)),
        st.text(max_size=20),  # a stray word, taken for a config file that does not exist
    )


@FAST
@given(st.lists(option(), max_size=4))
def test_parse_config_raises_only_user_errors(argv):
    argv = [a for a in argv if a not in ("-h", "--help")]
    try:
        config = parse_config(TRAIN_DEFAULTS, argv)
    except UserError as e:
        assert str(e) and "\n" not in one_line(str(e))  # what main_guard prints: one line
        return
    for key, default in TRAIN_DEFAULTS.items():  # what comes back keeps every key's type
        if default is not None:
            assert isinstance(config[key], type(default)) or (
                isinstance(default, float) and isinstance(config[key], float)
            )


@FAST
@given(
    st.binary(max_size=300),
    st.sampled_from(["line", "paragraph", "file"]),
    st.sampled_from(["strict", "replace"]),
)
def test_the_line_reader_takes_any_bytes_or_says_where_they_are_not_utf8(tmp_path, data, example, errors):
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    try:
        examples = [e for _, batch in prepare.read_examples(str(path), errors, example) for e in batch]
    except UserError as e:
        assert errors == "strict" and str(e).startswith(f"{path} is not UTF-8: byte 0x")
        return
    text = data.decode("utf-8", errors=errors).removeprefix("\ufeff")
    if example == "line":
        assert examples == [line.removesuffix("\r") for line in text.split("\n") if line.removesuffix("\r").strip()]
    elif example == "file":
        assert (
            "".join(examples) == "".join(line.removesuffix("\r") + "\n" for line in text.removesuffix("\n").split("\n"))
            or text == ""
        )
    else:
        assert all(e.strip() and "\n\n" not in e for e in examples)


TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=80)  # any Unicode but lone surrogates


@pytest.fixture(scope="module")
def tokenizers():
    corpus = "The baby is sleeping. Ünïcödé 🙂 東京 grin planned\n\t  numbers 123"
    gpt2 = tok.GPT2()
    compact = tok.CompactGPT2.from_used_ids(gpt2.encode(corpus))
    return {
        "gpt2": gpt2,
        "compact": compact,
        "compact-bytes": tok.CompactGPT2(compact.gpt2_ids, "bytes"),
        "char": tok.Char.from_counts(set(corpus)),
        "word": tok.Word.from_counts({w: 2 for w in tok.Word.pieces(corpus)}, 100, 1),
    }


@FAST
@given(TEXT)
def test_byte_level_tokenizers_round_trip_any_text(tokenizers, text):
    for name in ("gpt2", "compact", "compact-bytes"):
        tokenizer = tokenizers[name]
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size and i != tokenizer.eot for i in ids)
        assert tokenizer.decode(ids) == text
        assert tok.encode_examples(tokenizer, [text, text], threads=2).tolist() == (ids + [tokenizer.eot]) * 2


@FAST
@given(TEXT)
def test_char_and_word_keep_what_they_know(tokenizers, text):
    char, word = tokenizers["char"], tokenizers["word"]
    known = "".join(c for c in text if c in char.ids)
    assert char.decode(char.encode(text)) == known and set(char.unknown(text)) == set(text) - set(known)
    ids = word.encode(text)
    assert len(ids) == len(tok.Word.pieces(text)) and all(0 <= i < word.vocab_size for i in ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(TEXT.filter(lambda t: "\n" not in t and "\r" not in t and t.strip()), min_size=2, max_size=8),
    st.sampled_from(["gpt2", "char"]),
)
def test_text_that_prepares_round_trips(tmp_path_factory, lines, kind):
    folder = tmp_path_factory.mktemp("prep")
    (folder / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import json
    import subprocess
    import sys

    import numpy as np

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "prepare.py"),
            "--input=in.txt",
            f"--tokenizer={kind}",
            "--split=last",
            "--val_fraction=0.3",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        return
    meta = json.loads((folder / "data" / "meta.json").read_text())
    tokenizer = tok.from_meta(meta)
    decoded = []
    for split in ("train", "val"):
        ids = np.fromfile(folder / "data" / f"{split}.bin", dtype=np.uint16).tolist()
        starts = [0] + [i + 1 for i, t in enumerate(ids) if t == tokenizer.eot]
        decoded += [tokenizer.decode(ids[s : e - 1]) for s, e in zip(starts, starts[1:])]
    assert decoded == lines


# ----------------------------------------------------------------------------- the sampling settings a server takes


def in_range():
    """Sampling settings anywhere inside the ranges check_sampling allows, their edges and subnormals included."""
    edges = lambda lo, hi: st.one_of(st.floats(lo, hi), st.sampled_from([lo, hi, 5e-324, 1e-300, 1e-5]).filter(
        lambda x: lo <= x <= hi))  # fmt: skip
    return st.builds(
        Sampling,
        temperature=edges(0.0, 2.0),
        top_k=st.one_of(st.none(), st.integers(-1, 80)),
        top_p=edges(0.0, 1.0).filter(lambda p: p > 0),
        seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        presence_penalty=edges(-2.0, 2.0),
        frequency_penalty=edges(-2.0, 2.0),
        repetition_penalty=edges(0.01, 100.0),
        logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 63), edges(-100.0, 100.0), max_size=6)),
        min_tokens=st.integers(0, 4),
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(in_range(), min_size=1, max_size=4), st.integers(0, 2**32 - 1),
       st.sampled_from(["float32", "bfloat16"]), st.floats(0.1, 1e4))  # fmt: skip
def test_every_setting_in_range_samples_a_token_beside_any_other(settings_, seed, dtype, scale):
    # a request the validator lets in never breaks the step it shares with other clients' requests
    import torch

    from tensegpt import sampler
    from tensegpt.sequence import Sequence, check_sampling

    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for s in settings_:
        check_sampling(s, 64, max_tokens=8)
        sequences.append(Sequence([1, 2, 3], 8, frozenset({0, 5}), s, tokens=[3, 3, 7][: seed % 4]))
    logits = (torch.randn(len(sequences), 64, generator=generator) * scale).to(getattr(torch, dtype))
    tokens = sampler.sample(sequences, logits)
    for s, token in zip(sequences, tokens):
        assert 0 <= token < 64
        if len(s.tokens) < s.sampling.min_tokens:
            assert token not in s.stop_tokens
    assert all(lp <= 1e-6 for lp, _ in filter(None, sampler.scores(sequences, logits, tokens)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["temperature", "top_k", "top_p", "seed", "presence_penalty", "frequency_penalty",
                        "repetition_penalty", "logit_bias", "min_tokens"]), st.data())  # fmt: skip
def test_a_setting_out_of_its_range_is_refused_by_name(name, data):
    from tensegpt.sequence import SettingError, check_sampling

    outside = {
        "temperature": st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=2.0000001), st.just(float("nan"))),
        "top_k": st.one_of(st.integers(max_value=-2), st.floats(0.5, 9.5).filter(lambda k: k != int(k))),
        "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0000001), st.just(float("nan"))),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63)),
        "presence_penalty": st.one_of(st.floats(min_value=2.0000001), st.just(float("inf")), st.just(float("nan"))),
        "frequency_penalty": st.one_of(st.floats(max_value=-2.0000001), st.just(float("nan"))),
        "repetition_penalty": st.one_of(st.floats(max_value=0.0099999), st.floats(min_value=100.0001), st.just(0.0)),
        "logit_bias": st.one_of(
            st.dictionaries(st.integers(64, 10**6), st.floats(-100, 100), min_size=1),
            st.dictionaries(st.integers(0, 63), st.floats(min_value=100.001), min_size=1),
            st.just({3: float("nan")}),
        ),  # fmt: skip
        "min_tokens": st.one_of(st.integers(max_value=-1), st.integers(9, 10**6)),
    }[name]
    value = data.draw(outside)
    with pytest.raises(SettingError) as refused:
        check_sampling(Sampling(**{name: value}), 64, max_tokens=8)
    assert refused.value.name == name and str(refused.value).startswith(f"{name} m")
