import json

import numpy as np
import pytest
from helpers import run_script, tense_lines

from tensegpt import tokenizer as tok


def decode_lines(folder, split):
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tok.from_meta(meta)
    ids = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
    assert ids[-1] == tokenizer.eot  # every line ends with end-of-text
    lines, current = [], []
    for i in ids.tolist():
        if i == tokenizer.eot:
            lines.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    return lines, meta


def test_prepare_writes_uint16_files_that_decode_back_to_the_lines(tmp_path):
    lines = tense_lines(300) + [
        "Ünïcödé and emoji 🙂 survive.",
        "  leading spaces too",
        "typed <|endoftext|> is text",
    ]
    (tmp_path / "in.txt").write_text(
        "\n".join(lines[:150]) + "\n\n   \n" + "\n".join(lines[150:]) + "\n", encoding="utf-8"
    )
    out = run_script("prepare.py", "--input=in.txt", "--out_dir=d", "--seed=3", cwd=tmp_path)
    assert "train" in out.stdout and "d/train.bin" in out.stdout
    train, meta = decode_lines(tmp_path / "d", "train")
    val, _ = decode_lines(tmp_path / "d", "val")
    # whole lines, none lost or split, blank lines dropped; val ~10%, order kept in each split
    assert sorted(train + val) == sorted(lines)
    assert len(val) == round(303 * 0.1)
    assert train == [line for line in lines if line in set(train)]
    assert not set(train) & set(val)
    assert meta["tokenizer"] == "gpt2-compact" and meta["train_lines"] == len(train) and meta["val_lines"] == len(val)
    assert meta["train_tokens"] == (tmp_path / "d" / "train.bin").stat().st_size // 2
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "in.txt").read_bytes()).hexdigest()


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(200)) + "\n", encoding="utf-8")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_script("prepare.py", "--input=in.txt", f"--out_dir={name}", f"--seed={seed}", cwd=tmp_path)
    read = lambda name: (tmp_path / name / "val.bin").read_bytes()
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_compact_and_full_vocab_files_hold_the_same_text(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(200)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=in.txt", "--out_dir=compact", "--min_frequency=1", cwd=tmp_path)
    run_script("prepare.py", "--input=in.txt", "--out_dir=full", "--full_vocab=True", cwd=tmp_path)
    for split in ("train", "val"):
        compact_lines, compact_meta = decode_lines(tmp_path / "compact", split)
        full_lines, full_meta = decode_lines(tmp_path / "full", split)
        assert compact_lines == full_lines
    assert full_meta["tokenizer"] == "gpt2" and full_meta["vocab_size"] == 50257
    assert compact_meta["vocab_size"] < 1000
    full_ids = np.fromfile(tmp_path / "full" / "train.bin", dtype=np.uint16)
    compact_ids = np.fromfile(tmp_path / "compact" / "train.bin", dtype=np.uint16)
    assert full_ids.max() == 50256 and compact_ids.max() < compact_meta["vocab_size"]
    # the same tokens, renumbered: the compact ids map back to exactly the GPT-2 ids
    assert np.array_equal(np.array(compact_meta["gpt2_ids"])[compact_ids], full_ids)


@pytest.mark.parametrize("kind", ["gpt2", "compact", "legacy-compact", "char"])
def test_fast_batch_encoding_equals_encoding_each_line(kind):
    lines = tense_lines(50) + [
        "  two leading spaces",
        "trailing   ",
        "\ttab",
        "x\r",
        "数字 123 🙂",
        "'s 'll ?!",
    ]
    tokenizer = {
        "gpt2": lambda: tok.GPT2(),
        "compact": lambda: tok.CompactGPT2.from_used_ids(tok.GPT2().encode(" ".join(lines[:20]))),
        "legacy-compact": lambda: tok.CompactGPT2(tok.CompactGPT2.from_used_ids([464]).gpt2_ids, "bytes"),
        "char": lambda: tok.Char.from_counts(set("".join(lines))),
    }[kind]()
    expected = [i for line in lines for i in tokenizer.encode(line) + [tokenizer.eot]]
    for threads in (1, 2, 3):
        assert tok.encode_examples(tokenizer, lines, threads).tolist() == expected
    with_special = lines + ["<|endoftext|> as text"]
    assert tok.encode_examples(tokenizer, with_special, 2).tolist() == (
        expected + tokenizer.encode("<|endoftext|> as text") + [tokenizer.eot]
    )


PROSE = [
    "Alice was beginning to get very tired of sitting by her\nsister on the bank, and of having nothing to do.",
    "So she was considering in her own mind (as well as she could,\nfor the hot day made her feel very "
    "sleepy)\nwhether to get up.",
    "There was nothing so very remarkable in that.",
    "Down, down, down. Would the fall never come\nto an end?",
    "Presently she began again. 'Let me see: four times five is twelve, and four\ntimes six is thirteen, and "
    "four times\nseven is--oh dear! I shall never get to twenty at\nthat rate!'",
]


def split_at_eot(folder, split):
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tok.from_meta(meta)
    ids = np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist()
    starts = [0] + [i + 1 for i, t in enumerate(ids) if t == tokenizer.eot]
    return [tokenizer.decode(ids[s : e - 1]) for s, e in zip(starts, starts[1:])], meta


def test_paragraph_examples_keep_their_line_breaks_and_last_split_holds_the_end(tmp_path):
    text = "\ufeff" + "\n\n".join(PROSE * 4).replace("\n\n", "\n   \n\n", 3) + "\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = run_script(
        "prepare.py",
        "--input=book.txt",
        "--example=paragraph",
        "--split=last",
        "--val_fraction=0.25",
        cwd=tmp_path,
    )
    train, meta = split_at_eot(tmp_path / "data", "train")
    val, _ = split_at_eot(tmp_path / "data", "val")
    assert train + val == PROSE * 4  # the byte-order mark is gone, blank lines (even with spaces) only separate
    assert val == (PROSE * 4)[-5:] and meta["example"] == "paragraph" and meta["split"] == "last"
    assert meta["val_bytes"] == sum(len(p.encode()) + 1 for p in val)
    assert "hint" not in out.stderr and "20 paragraphs" in out.stdout


def test_file_example_is_one_stream_cut_at_a_line_break(tmp_path):
    text = "\n\n".join(PROSE * 4) + "\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    run_script("prepare.py", "--input=book.txt", "--example=file", cwd=tmp_path)
    train, meta = split_at_eot(tmp_path / "data", "train")
    val, _ = split_at_eot(tmp_path / "data", "val")
    assert len(train) == len(val) == 1  # one end-of-text each, at the end
    assert train[0] + val[0] == text and train[0].endswith("\n") and meta["split"] == "last"
    assert meta["val_bytes"] + meta["train_bytes"] == len(text.encode())
    assert run_script(
        "prepare.py", "--input=book.txt", "--example=file", "--split=random", cwd=tmp_path, check=False
    ).stderr.strip() == (
        "error: --example=file is one stream, so its val split is the end of the text: use --split=last (or auto)"
    )


def test_wrapped_prose_under_the_line_setting_gets_a_hint(tmp_path):
    (tmp_path / "book.txt").write_text("\n\n".join(PROSE * 6) + "\n", encoding="utf-8")
    out = run_script("prepare.py", "--input=book.txt", cwd=tmp_path)
    assert out.stderr.startswith("hint: 58% of the lines of book.txt end mid-sentence")
    assert "--example=paragraph" in out.stderr
    assert "hint" not in run_script("prepare.py", "--input=book.txt", "--example=paragraph", cwd=tmp_path).stderr
    (tmp_path / "sentences.txt").write_text("\n".join(tense_lines(100)) + "\n")
    assert run_script("prepare.py", "--input=sentences.txt", cwd=tmp_path).stderr == ""


def test_val_words_unseen_in_train_use_learned_pieces(tmp_path):
    lines = ["The grin was wide and the cat was planned."] * 30 + ["The cat grinned."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    run_script("prepare.py", "--input=in.txt", "--split=last", "--val_fraction=0.03", cwd=tmp_path)
    val, meta = split_at_eot(tmp_path / "data", "val")
    tokenizer = tok.from_meta(meta)
    assert val == ["The cat grinned."]
    # the vocabulary is the train split's: " grinned" is not in it: " grin" "n" "ed", not 8 bytes
    ids = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16).tolist()
    assert [tokenizer.decode([i]) for i in ids[:-1]] == ["The", " cat", " grin", "n", "ed", "."]


def test_a_token_train_has_too_rarely_is_split_into_pieces_it_has_more_often(tmp_path):
    lines = ["The grin was wide and the cat was planned."] * 30 + ["The cat grinned."] + ["The cat sat."] * 4
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    pieces = {}
    for min_frequency in (1, 2):
        out = f"--out_dir=min{min_frequency}"
        run_script(
            "prepare.py",
            "--input=in.txt",
            "--split=last",
            "--val_fraction=0.1",
            f"--min_frequency={min_frequency}",
            out,
            cwd=tmp_path,
        )
        train, meta = split_at_eot(tmp_path / f"min{min_frequency}", "train")
        assert train == lines[:-4]  # the same text either way
        tokenizer = tok.from_meta(meta)
        ids = np.fromfile(tmp_path / f"min{min_frequency}" / "train.bin", dtype=np.uint16).tolist()
        ends = [i for i, t in enumerate(ids) if t == tokenizer.eot]
        pieces[min_frequency] = [tokenizer.decode([t]) for t in ids[ends[-2] + 1 : ends[-1]]]  # the last train line's
    # " grinned" occurs once: kept as GPT-2's one token only with --min_frequency=1; else its pieces
    assert pieces[1] == ["The", " cat", " grinned", "."]
    assert pieces[2] == ["The", " cat", " grin", "n", "ed", "."]
