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
