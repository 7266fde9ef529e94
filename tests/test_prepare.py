import json

import numpy as np

import tokenizer as tok
from conftest import run_script, tense_lines


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
    lines = tense_lines(300) + ["Ünïcödé and emoji 🙂 survive.", "  leading spaces too", "typed <|endoftext|> is text"]
    (tmp_path / "in.txt").write_text("\n".join(lines[:150]) + "\n\n   \n" + "\n".join(lines[150:]) + "\n", encoding="utf-8")
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
    read = lambda name: (tmp_path / name / "val.bin").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_compact_and_full_vocab_files_hold_the_same_text(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(200)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=in.txt", "--out_dir=compact", cwd=tmp_path)
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


def test_fast_batch_encoding_equals_encoding_each_line():
    from prepare import encode_lines
    enc = tok.gpt2_encoding()
    lines = tense_lines(50) + ["  two leading spaces", "trailing   ", "\ttab", "x\r", "数字 123 🙂", "'s 'll ?!"]
    expected = [i for line in lines for i in enc.encode_ordinary(line) + [tok.GPT2_EOT]]
    for threads in (1, 2, 3):
        assert encode_lines(enc, lines, threads).tolist() == expected
    with_special = lines + ["<|endoftext|> as text"]
    assert encode_lines(enc, with_special, 2).tolist() == expected + enc.encode_ordinary("<|endoftext|> as text") + [tok.GPT2_EOT]
