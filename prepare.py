"""
Tokenizes a text file into train.bin / val.bin (uint16 token ids) and meta.json.

    python prepare.py                                   # tense.txt -> data/
    python prepare.py --input=my.txt --out_dir=data/my --val_fraction=0.05 --seed=1
    python prepare.py --input=book.txt --out_dir=data/book --example=paragraph --split=last

What one example is (--example): a non-blank line (the default: tense.txt is one sentence
a line), a paragraph (a block of lines between blank lines; its inner line breaks stay
text), or the whole file as one stream (nanoGPT's way). Each example is its tokens and
then the end-of-text token, so the model learns where an example ends and sampling stops
there. Whole examples are split between train and val (--split): a seeded random choice,
or the last val_fraction of them (a book's ending, held out the way nanoGPT holds out the
end of its text). A file stream is split at a line break that far from its end. Both
files keep the text's order.

By default the ids are compact (see tokenizer.py): a smaller BPE cut out of GPT-2's, made
of the tokens the train split uses at least --min_frequency times (a rarer one is split
into pieces the vocabulary keeps, as an unseen word will be). --full_vocab keeps plain
GPT-2 ids. --tokenizer=char gives one id per character of the text, --tokenizer=word a
word-level vocabulary (--vocab_size, --min_frequency); their vocabularies are built from
the whole text.
"""

import collections
import hashlib
import itertools
import json
import os
import sys
import time

import numpy as np

from tensegpt import tokenizer as tok
from tensegpt.chat import ChatTokenizer, is_chat_file, numbered_contents, read_conversations
from tensegpt.common import (
    UserError,
    atomic_write,
    check_seed,
    check_writable_folder,
    main_guard,
    parse_config,
)

DEFAULTS = {
    "input": "tense.txt",  # the UTF-8 text file to tokenize
    "out_dir": "data",  # where train.bin, val.bin and meta.json go
    "val_fraction": 0.1,  # share of the examples held out for validation
    "seed": 1337,  # which examples go to validation (0 to 2**32 - 1)
    "example": "line",  # 'line', 'paragraph' (blocks between blank lines) or 'file' (the text as one stream)
    "split": "auto",  # 'random' (seeded choice of examples) or 'last' (the end); auto: random, last for file
    "full_vocab": False,  # True: plain GPT-2 ids (a model with all 50,257 tokens)
    "errors": "strict",  # 'strict': stop at bytes that are not UTF-8; 'replace': use U+FFFD
    "tokenizer": "gpt2",  # 'gpt2' (BPE), 'char' (one id per character) or 'word' (word level)
    "vocab_size": 5000,  # word: at most this many ids, the most frequent words first
    "min_frequency": 0,  # rarer tokens get no id (gpt2: kept pieces; word: <unk>); 0: 4 for gpt2, 2 for word
    "vocab_from": "",  # a data folder or checkpoint whose vocabulary to use (to fine-tune it); empty: new
    "val_input": "",  # a .jsonl of conversations held out for validation; empty: val_fraction of --input's
}
# gpt2: 4 gave the best held-out bits per byte on Alice (README, "Training on your own text")
MIN_FREQUENCY = {"gpt2": 4, "word": 2}
BATCH_BYTES = 1 << 22  # lines are read, decoded and tokenized about 4 MB at a time
PROGRESS_BYTES = 8 << 20  # inputs larger than this print their progress
SENTENCE_END = tuple(".!?:;\"'\u201d\u2019")  # a line that ends with none of these ends mid-sentence


def read_batches(path, errors):
    """Yields (bytes read so far, list of lines) for a file, a batch of lines at a time."""
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw_lines = f.readlines(BATCH_BYTES)
            if not raw_lines:
                return
            chunk = b"".join(raw_lines)
            try:
                text = chunk.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                line = offset_to_line(path, offset + e.start)
                raise UserError(
                    f"{path} is not UTF-8: byte 0x{chunk[e.start]:02x} at offset {offset + e.start} (line "
                    f"{line}); "
                    f"convert it to UTF-8, or pass --errors=replace to replace bad bytes with U+FFFD"
                ) from None
            if offset == 0:
                text = text.removeprefix("\ufeff")  # a byte-order mark marks the encoding; it is not text
            offset += len(chunk)
            lines = text.split("\n")  # not splitlines(): only \n ends a line
            if text.endswith("\n"):
                lines.pop()
            yield offset, [line.removesuffix("\r") for line in lines]


def read_examples(path, errors, example):
    """
    Yields (bytes read so far, list of examples), a batch at a time. line: each non-blank
    line; paragraph: runs of non-blank lines joined by "\n"; file: every line with its
    "\n" (blank ones too), to be encoded as one stream.
    """
    paragraph = []
    for done, lines in read_batches(path, errors):
        if example == "line":
            yield done, [line for line in lines if line.strip()]
        elif example == "file":
            yield done, [line + "\n" for line in lines]
        else:
            out = []
            for line in lines:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    out.append("\n".join(paragraph))
                    paragraph = []
            yield done, out
    if paragraph:
        yield None, ["\n".join(paragraph)]


def offset_to_line(path, offset):
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def check_options(config):
    checks = [
        (
            0.0 < config["val_fraction"] < 1.0,
            f"--val_fraction must be between 0 and 1 (exclusive), got {config['val_fraction']}",
        ),
        (
            config["example"] in ("line", "paragraph", "file"),
            f"--example must be line, paragraph or file, got {config['example']!r}",
        ),
        (
            config["split"] in ("auto", "random", "last"),
            f"--split must be auto, random or last, got {config['split']!r}",
        ),
        (
            not (config["example"] == "file" and config["split"] == "random"),
            "--example=file is one stream, so its val split is the end of the text: use --split=last (or auto)",
        ),
        (
            config["tokenizer"] in ("gpt2", "char", "word"),
            f"--tokenizer must be gpt2, char or word, got {config['tokenizer']!r}",
        ),
        (
            not config["full_vocab"] or config["tokenizer"] == "gpt2",
            f"--full_vocab applies to --tokenizer=gpt2 only (got --tokenizer={config['tokenizer']})",
        ),
        (
            config["tokenizer"] != "word" or 4 < config["vocab_size"] <= 65536,
            f"--vocab_size must be between 5 and 65536 (4 ids are special tokens), got {config['vocab_size']}",
        ),
        (
            config["min_frequency"] >= 0,
            f"--min_frequency must be 1 or more (0: the tokenizer's default), got {config['min_frequency']}",
        ),
        (
            config["tokenizer"] == "word" or config["vocab_size"] == DEFAULTS["vocab_size"],
            f"--vocab_size applies to --tokenizer=word only; a {config['tokenizer']} vocabulary is what the "
            "text uses" + (" (--min_frequency makes the compact one smaller)" if config["tokenizer"] == "gpt2" else ""),
        ),
        (
            config["min_frequency"] == 0
            or config["tokenizer"] == "word"
            or (config["tokenizer"] == "gpt2" and not config["full_vocab"]),
            "--min_frequency applies to the compact gpt2 vocabulary and to --tokenizer=word: "
            + (
                "--full_vocab keeps all of GPT-2's tokens"
                if config["full_vocab"]
                else "char keeps every character of the text"
            ),
        ),
        (
            config["errors"] in ("strict", "replace"),
            f"--errors must be 'strict' or 'replace', got {config['errors']!r}",
        ),
        (config["input"] != "", "--input is empty: pass --input=FILE with a UTF-8 text file"),
        (
            not config["val_input"] or (is_chat_file(config["input"]) and is_chat_file(config["val_input"])),
            "--val_input holds the held-out conversations of a .jsonl --input: give both as .jsonl files",
        ),
        (
            not config["vocab_from"] or (config["tokenizer"] == "gpt2" and not config["full_vocab"]),
            "--vocab_from takes the whole vocabulary of the folder or checkpoint it names: leave out "
            "--tokenizer and --full_vocab",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_seed(config)
    path = config["input"]
    if os.path.isdir(path):
        raise UserError(f"--input={path} is a folder: pass --input=FILE with a UTF-8 text file")
    for key in ("input", "val_input"):
        if config[key] and not os.path.isfile(config[key]):
            what = "a UTF-8 text file" if key == "input" else "a .jsonl file of conversations"
            raise UserError(f"{key} file {config[key]} does not exist; pass --{key}=FILE with {what}")
    if config["vocab_from"] and not os.path.exists(config["vocab_from"]):
        raise UserError(f"--vocab_from={config['vocab_from']} does not exist: pass a data folder or a trained.pth")


def tokenize_split(path, errors, example, is_val, split, tokenizer):
    """(uint16 ids, {examples, chars, bytes}) of a split: a batch at a time, GPT-2 on every core."""
    threads, size = os.cpu_count() or 1, os.path.getsize(path)
    parts, n, chars, nbytes, first, started = [], 0, 0, 0, 0, time.time()
    for done, examples in read_examples(path, errors, example):
        mine = [e for e, v in zip(examples, is_val[first : first + len(examples)]) if v == (split == "val")]
        first += len(examples)
        n += len(mine)
        if example == "file":  # one stream: no end-of-text between its pieces
            mine = ["".join(mine)] if mine else []
            parts.append(tok.encode_examples(tokenizer, mine, threads)[:-1])
        else:
            parts.append(tok.encode_examples(tokenizer, mine, threads))
        sep = 0 if example == "file" else 1  # the end-of-text stands for the line break(s) after an example
        chars += sum(len(e) + sep for e in mine)
        nbytes += sum(len(e.encode("utf-8", "surrogatepass")) + sep for e in mine)
        if size > PROGRESS_BYTES and done is not None:
            rate = done / 1e6 / max(time.time() - started, 1e-9)
            print(
                f"{split}: tokenized {done / 1e6:.1f} / {size / 1e6:.1f} MB ({100 * done / size:.0f}%), "
                f"{rate:.1f} MB/s",
                flush=True,
            )
    if example == "file":
        parts.append(np.array([tokenizer.eot], dtype=np.uint16))
    ids = np.concatenate(parts)
    if len(ids) < 2:
        raise UserError(
            f"{path} is too small: its {split} split has {len(ids)} token(s), at least 2 are needed; "
            f"add more text{' or raise --val_fraction' if split == 'val' else ''}"
        )
    return ids, {"examples": n, "chars": chars, "bytes": nbytes}


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_options(config)
    if is_chat_file(config["input"]):  # conversations: their own story, below
        return prepare_chat(config)
    path, out_dir, example, kind = config["input"], config["out_dir"], config["example"], config["tokenizer"]
    min_frequency = config["min_frequency"] or MIN_FREQUENCY.get(kind)  # char has none
    check_writable_folder(out_dir, "out_dir")

    # Pass 1: check the text decodes, count its examples, hash it; char and word build their vocabulary.
    n_examples, counts, lines, open_lines, has_text = 0, collections.Counter(), 0, 0, False
    for _, examples in read_examples(path, config["errors"], example):
        n_examples += len(examples)
        has_text = has_text or any(not e.isspace() for e in examples if e)
        if kind == "char":
            counts.update(itertools.chain.from_iterable(examples))
        elif kind == "word":
            counts.update(itertools.chain.from_iterable(map(tok.Word.pieces, examples)))
        if example == "line":
            lines += len(examples)
            open_lines += sum(not line.rstrip().endswith(SENTENCE_END) for line in examples)
    noun = {"line": "lines", "paragraph": "paragraphs", "file": "lines"}[example]
    if not has_text:  # --example=file keeps blank lines as examples: count only text
        raise UserError(f"{path} has no text (it is empty or only whitespace); give it at least a few lines")
    if n_examples < 2:
        raise UserError(
            f"{path} is too small: it has 1 {noun[:-1]}, and train and val need at least one each; add more {noun}"
        )
    if config["vocab_from"]:  # the vocabulary of the model this text will fine-tune
        tokenizer = vocabulary_of(config["vocab_from"])
        line_end = "" if example == "line" else "\n"  # a paragraph's or a stream's line breaks are text
        tok.check_spelled(tokenizer, numbered_lines(path, config["errors"], line_end), config["vocab_from"])
    elif kind == "char":
        if len(counts) + 1 > 65536:
            raise UserError(
                f"{path} has {len(counts):,} distinct characters, more than the 65,535 that uint16 ids can "
                "hold "
                f"with end-of-text: use --tokenizer=gpt2"
            )
        tokenizer = tok.Char.from_counts(counts)
    elif kind == "word":
        tokenizer = tok.Word.from_counts(counts, config["vocab_size"], min_frequency)
    else:
        tokenizer = tok.GPT2()  # made compact after the train split, once we know which ids it uses
    if lines >= 20 and open_lines > lines / 2:
        print(
            f"hint: {100 * open_lines // lines}% of the lines of {path} end mid-sentence, as wrapped prose "
            "does; with "
            f"--example=line each line is a separate example. For a book use --example=paragraph (or file)",
            file=sys.stderr,
        )

    # Which examples go to val: a seeded random choice, or the last ones.
    n_val = min(n_examples - 1, max(1, round(n_examples * config["val_fraction"])))
    is_val = np.zeros(n_examples, dtype=bool)
    if config["split"] == "random" or (config["split"] == "auto" and example != "file"):
        is_val[np.random.default_rng(config["seed"]).choice(n_examples, size=n_val, replace=False)] = True
    else:
        is_val[n_examples - n_val :] = True

    # Pass 2 tokenizes the train examples, pass 3 the val ones with the finished tokenizer (the
    # compact vocabulary is the train split's): a batch at a time, GPT-2 on every core.
    data, counted = {}, {}
    data["train"], counted["train"] = tokenize_split(path, config["errors"], example, is_val, "train", tokenizer)
    if kind == "gpt2" and not config["full_vocab"] and not config["vocab_from"]:
        counts = np.bincount(data["train"], minlength=tok.GPT2_EOT + 1)
        tokenizer = tok.CompactGPT2.from_used_ids(np.flatnonzero(counts >= min_frequency).tolist())
        to_compact = np.full(tok.GPT2_EOT + 1, -1, dtype=np.int64)
        to_compact[tokenizer.gpt2_ids] = np.arange(tokenizer.vocab_size)
        if (to_compact[np.flatnonzero(counts)] >= 0).all():
            data["train"] = to_compact[data["train"]].astype(
                np.uint16
            )  # the same tokens: the compact BPE encodes them alike
        else:  # rarer tokens than --min_frequency now split into pieces seen elsewhere: encode again
            if os.path.getsize(path) > PROGRESS_BYTES:
                rare = int((to_compact[np.flatnonzero(counts)] < 0).sum())
                print(
                    f"train: encoding again with the compact vocabulary ({rare:,} rarer GPT-2 tokens split "
                    "into pieces)",
                    flush=True,
                )
            data["train"], _ = tokenize_split(path, config["errors"], example, is_val, "train", tokenizer)
    data["val"], counted["val"] = tokenize_split(path, config["errors"], example, is_val, "val", tokenizer)

    meta = {
        **tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot": tokenizer.eot,
        "dtype": "uint16",
        "train_tokens": int(len(data["train"])),
        "val_tokens": int(len(data["val"])),
        "train_lines": counted["train"]["examples"],  # examples; "lines" for the data folders made before --example
        "val_lines": counted["val"]["examples"],
        "train_chars": counted["train"]["chars"],
        "val_chars": counted["val"]["chars"],
        "train_bytes": counted["train"]["bytes"],  # UTF-8 bytes of the text: for bits per byte
        "val_bytes": counted["val"]["bytes"],
        "example": example,
        "split": "last" if config["split"] == "last" or example == "file" else "random",
        "source": os.path.abspath(path),
        "source_sha256": sha256_of(path),
        "val_fraction": config["val_fraction"],
        "seed": config["seed"],
        **({"vocab_from": config["vocab_from"]} if config["vocab_from"] else {}),
    }
    # Each file is replaced atomically; meta.json goes last and records the token counts,
    # so train.py can tell if an interrupted run left .bin files that don't match it.
    for split, arr in data.items():
        atomic_write(os.path.join(out_dir, f"{split}.bin"), arr.tofile)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    print(
        f"{path}: {n_examples:,} {noun} -> train {meta['train_tokens']:,} tokens ({meta['train_lines']:,} "
        f"{noun}), "
        f"val {meta['val_tokens']:,} tokens ({meta['val_lines']:,} {noun}); "
        f"tokenizer {meta['tokenizer']}, vocab {tokenizer.vocab_size:,}; wrote {out_dir}/train.bin, val.bin, "
        "meta.json"
    )


def sha256_of(*paths):
    """One sha256 over the files named (empty names skipped), read 16 MB at a time."""
    sha = hashlib.sha256()
    for path in filter(None, paths):
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()


def numbered_lines(path, errors, end=""):
    """('PATH line N', line + end) for each line of a text file (end: a line break where it is text)."""
    number = 0
    for _, lines in read_batches(path, errors):
        for line in lines:
            number += 1
            yield f"{path} line {number}", line + end


def vocabulary_of(path):
    """The tokenizer (without chat tokens) of a data folder or a checkpoint: --vocab_from."""
    if os.path.isdir(path):
        meta = tok.read_meta(path)
    else:
        from tensegpt import checkpoint  # imports torch: only here

        hint = "pass the data folder or the trained.pth of the model to fine-tune"
        meta = checkpoint.load(path, missing_hint=hint)["tokenizer_meta"]
    return tok.base_from_meta(meta)


def prepare_chat(config):
    """
    A JSONL file of conversations -> train.bin / val.bin (the template's token ids),
    train.mask.bin / val.mask.bin (1 where the loss counts: assistant turns) and meta.json.
    Whole conversations go to train or val: --val_input, or a seeded val_fraction of them.
    """
    path, out_dir, kind = config["input"], config["out_dir"], config["tokenizer"]
    check_writable_folder(out_dir, "out_dir")
    conversations = {"train": read_conversations(path)}
    if config["val_input"]:
        conversations["val"] = read_conversations(config["val_input"])
    else:
        every = conversations.pop("train")
        if len(every) < 2:
            raise UserError(f"{path} holds 1 conversation; train and val need at least one each: add more")
        n_val = min(len(every) - 1, max(1, round(len(every) * config["val_fraction"])))
        is_val = np.zeros(len(every), dtype=bool)
        is_val[np.random.default_rng(config["seed"]).choice(len(every), size=n_val, replace=False)] = True
        conversations = {
            split: [c for c, v in zip(every, is_val) if v == (split == "val")] for split in ("train", "val")
        }

    # the vocabulary: the base model's (--vocab_from), or built from the train conversations' text
    texts = [m["content"] for c in conversations["train"] for m in c]
    if config["vocab_from"]:
        base = vocabulary_of(config["vocab_from"])
        tok.check_spelled(base, numbered_contents(path, config["val_input"]), config["vocab_from"])
    elif kind == "char":
        base = tok.Char.from_counts(collections.Counter(itertools.chain.from_iterable(texts)))
    elif kind == "word":
        counts = collections.Counter(itertools.chain.from_iterable(map(tok.Word.pieces, texts)))
        base = tok.Word.from_counts(counts, config["vocab_size"], config["min_frequency"] or MIN_FREQUENCY["word"])
    elif config["full_vocab"]:
        base = tok.GPT2()
    else:
        gpt2_counts = np.bincount(tok.encode_examples(tok.GPT2(), texts), minlength=tok.GPT2_EOT + 1)
        min_frequency = config["min_frequency"] or MIN_FREQUENCY["gpt2"]
        base = tok.CompactGPT2.from_used_ids(np.flatnonzero(gpt2_counts >= min_frequency).tolist())
    tokenizer = ChatTokenizer(base)

    meta = {
        **tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot": tokenizer.eot,
        "dtype": "uint16",
        "chat": True,
    }
    for split, convs in conversations.items():
        pairs = [tokenizer.encode_conversation(c) for c in convs]
        ids = np.fromiter(itertools.chain.from_iterable(p[0] for p in pairs), dtype=np.uint16)
        trained = np.fromiter(itertools.chain.from_iterable(p[1] for p in pairs), dtype=np.uint8)
        atomic_write(os.path.join(out_dir, f"{split}.bin"), ids.tofile)
        atomic_write(os.path.join(out_dir, f"{split}.mask.bin"), trained.tofile)
        text_bytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) + 1 for c in convs for m in c)
        meta.update({f"{split}_tokens": len(ids), f"{split}_conversations": len(convs), f"{split}_bytes": text_bytes})
    meta.update({
        "example": "conversation", "split": "file" if config["val_input"] else "random",
        "source": os.path.abspath(path), "source_sha256": sha256_of(path, config["val_input"]),
        "val_fraction": config["val_fraction"], "seed": config["seed"],
        **({"vocab_from": config["vocab_from"]} if config["vocab_from"] else {}),
    })  # fmt: skip
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    print(
        f"{path}: {meta['train_conversations']:,} conversations -> train {meta['train_tokens']:,} tokens, "
        "val "
        f"{meta['val_tokens']:,} tokens ({meta['val_conversations']:,} conversations); tokenizer "
        f"{meta['tokenizer']} "
        f"with chat tokens, vocab {tokenizer.vocab_size:,}; wrote {out_dir}/train.bin, val.bin, their "
        ".mask.bin, meta.json"
    )


if __name__ == "__main__":
    main_guard(main)
