"""The character and word tokenizers beside GPT-2's BPE."""

import json

import numpy as np
import pytest
from helpers import ROOT, fails, run_script, talk, tense_lines, write_jsonl

from tensegpt import tokenizer as tok


def test_char_round_trip_and_ids():
    text = "The baby is sleeping.\nÜber 🙂"
    char = tok.Char.from_counts(set(text))
    assert char.eot == 0 and char.vocab_size == len(set(text)) + 1
    assert char.chars == ["<|endoftext|>"] + sorted(set(text))
    ids = char.encode(text)
    assert len(ids) == len(text) and char.decode(ids) == text
    # characters the corpus never had are dropped, and reported
    assert char.encode("Tx") == char.encode("T") and char.unknown("Tx!") == ["!", "x"]
    assert tok.from_meta(char.meta()).encode(text) == ids


def test_word_cleaning_round_trip_is_exact_up_to_lowercase_and_spacing():
    # decode(encode(text)) == the words and marks of text.lower(), joined by single
    # spaces, with no space before . , ! ? ; : ) ] } ' "
    word = tok.Word.from_counts({w: 5 for w in tok.Word.pieces("the baby is isn't it o'clock ? . , sleeping")}, 100, 1)
    assert word.decode(word.encode("The  BABY is\tsleeping, isn't it?")) == "the baby is sleeping, isn't it?"
    assert tok.Word.pieces("It's 8 o'clock. Yes!") == ["it's", "8", "o'clock", ".", "yes", "!"]
    for line in ("The baby is sleeping.", "Is the baby sleeping?"):
        assert word.decode(word.encode(line)) == line.lower()


def test_word_special_tokens_and_frequency_order():
    counts = {"the": 10, "baby": 7, "is": 7, "sleeping": 3, "rare": 1}
    word = tok.Word.from_counts(counts, vocab_size=100, min_frequency=2)
    assert word.words[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert (word.pad, word.unk, word.bos, word.eot) == (0, 1, 2, 3)
    assert word.words[4:] == ["the", "baby", "is", "sleeping"]  # by frequency, ties alphabetical
    assert word.encode("the rare baby") == [4, 1, 5]  # rarer than min_frequency: <unk>
    assert word.decode([2, 4, 1, 5, 3, 0]) == "the <unk> baby"  # bos, eos and pad print nothing
    capped = tok.Word.from_counts(counts, vocab_size=6, min_frequency=1)
    assert capped.words[4:] == ["the", "baby"] and capped.encode("is") == [capped.unk]
    assert word.unknown("The rare, rarer baby") == [",", "rare", "rarer"]


@pytest.mark.parametrize("kind", ["char", "word"])
def test_prepare_with_each_tokenizer_decodes_back(tmp_path, kind):
    lines = tense_lines(300)
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    run_script(
        "prepare.py",
        "--input=in.txt",
        f"--tokenizer={kind}",
        *(["--min_frequency=1"] if kind == "word" else []),
        cwd=tmp_path,
    )
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    tokenizer = tok.from_meta(meta)
    assert meta["tokenizer"] == kind and meta["vocab_size"] == tokenizer.vocab_size
    decoded = []
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "data" / f"{split}.bin", dtype=np.uint16).tolist()
        decoded += [
            tokenizer.decode(ids[s + 1 : e])
            for s, e in zip([-1] + ends(ids, tokenizer.eot)[:-1], ends(ids, tokenizer.eot))
        ]
    expected = lines if kind == "char" else [line.lower() for line in lines]
    assert sorted(decoded) == sorted(expected)
    assert meta["train_chars"] + meta["val_chars"] == sum(len(line) + 1 for line in lines)


def test_vocab_from_a_char_base_refuses_a_character_it_lacks_naming_the_line(tmp_path):
    (tmp_path / "base.txt").write_text("the baby ate an apple.\nthe dog ran.\n" * 4)
    run_script("prepare.py", "--input=base.txt", "--tokenizer=char", "--out_dir=base", cwd=tmp_path)
    (tmp_path / "more.txt").write_text("the dog ate.\nthe baby ran.\nthe cat sat on a mat.\n")
    message = fails("prepare.py", "--input=more.txt", "--vocab_from=base", "--out_dir=ft", cwd=tmp_path)
    assert message.startswith("error: more.txt line 3 has characters that the char vocabulary of base lacks")
    assert "'c', 'm', 's'" in message and not (tmp_path / "ft" / "meta.json").exists()  # nothing written
    # a paragraph's inner line break is text, which a base of single lines never had
    (tmp_path / "para.txt").write_text("the dog ran.\nthe baby ate.\n\nthe dog ate.\n")
    args = ["--input=para.txt", "--example=paragraph", "--vocab_from=base", "--out_dir=ft"]
    assert "para.txt line 1 has characters that the char vocabulary of base lacks ('\\n')" in fails(
        "prepare.py", *args, cwd=tmp_path
    )
    write_jsonl(tmp_path / "chat.jsonl", [talk("the dog ran.", "the baby ate.")] * 2 + [talk("the dog?", "yes")])
    message = fails("prepare.py", "--input=chat.jsonl", "--vocab_from=base", "--out_dir=ft", cwd=tmp_path)
    assert message.startswith("error: chat.jsonl line 3 has characters that the char vocabulary of base lacks ")
    assert "lacks ('?'):" in message  # the first message that has one


def test_vocab_from_a_word_base_counts_the_words_it_reads_as_unk(tmp_path):
    (tmp_path / "base.txt").write_text("the baby ate an apple.\nthe dog ran.\n" * 4)
    base = ["--input=base.txt", "--tokenizer=word", "--min_frequency=1", "--out_dir=base"]
    run_script("prepare.py", *base, cwd=tmp_path)
    (tmp_path / "more.txt").write_text("the dog ate.\nthe cat ran.\nthe cat sat.\n")
    out = run_script("prepare.py", "--input=more.txt", "--vocab_from=base", "--out_dir=ft", cwd=tmp_path)
    assert (
        "note: 3 of 12 words (25.0%; 2 distinct, first at more.txt line 2) are not in the word vocabulary "
        "of base and are read as <unk>. Most common: 'cat' 'sat'"
    ) in out.stderr
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["words"] == json.loads((tmp_path / "base" / "meta.json").read_text())["words"]


def ends(ids, eot):
    return [i for i, t in enumerate(ids) if t == eot]


@pytest.mark.slow  # the quick run leaves it out; CI runs it
@pytest.mark.parametrize("kind", ["char", "word"])
def test_checkpoint_samples_with_its_own_tokenizer(tmp_path, kind):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(1000)) + "\n")
    run_script("prepare.py", "--input=in.txt", f"--tokenizer={kind}", cwd=tmp_path)
    run_script("train.py", f"{ROOT}/config/tiny.py", "--out_dir=out", "--max_iters=20", cwd=tmp_path)
    result = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        "--start=The baby is",
        "--num_samples=2",
        "--max_new_tokens=30",
        cwd=tmp_path,
    )
    samples = result.stdout.rstrip("\n").split("\n---------------\n")
    prompt = "The baby is" if kind == "char" else "the baby is"
    assert len(samples) == 2 and all(s.startswith(prompt) for s in samples)
    assert "<|endoftext|>" not in result.stdout and "<eos>" not in result.stdout
    unknown = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        "--start=The b§aby zyzzyva is",
        "--num_samples=1",
        "--max_new_tokens=5",
        cwd=tmp_path,
    )
    if kind == "word":
        assert unknown.stderr.strip() == (
            "note: 4 words of the prompt are not in the vocabulary, read as <unk>: 'aby' 'b' 'zyzzyva' '§'"
        )
        assert unknown.stdout.startswith("the <unk> <unk> <unk> <unk> is")
    else:
        assert unknown.stderr.strip() == "note: 1 characters of the prompt are not in the vocabulary, dropped: '§'"
        assert unknown.stdout.startswith("The baby zyzzyva is")
