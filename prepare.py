"""
Tokenizes a text file into train.bin / val.bin (uint16 token ids) and meta.json.

    python prepare.py                                   # tense.txt -> data/
    python prepare.py --input=my.txt --out_dir=data/my --val_fraction=0.05 --seed=1

Each non-blank line is one example: its tokens, then the end-of-text token, so the model
learns where a sentence ends and sampling can stop there. Lines, not tokens, are split
between train and val (a seeded random choice), so val holds sentences the model never
saw; both files keep the text's order.

By default the ids are compact (see tokenizer.py): GPT-2's BPE renumbered to the tokens
the text uses. --full_vocab keeps plain GPT-2 ids. --tokenizer=char gives one id per
character of the text, --tokenizer=word a word-level vocabulary (--vocab_size,
--min_frequency); their vocabularies are built from the whole text.
"""
import collections
import hashlib
import itertools
import json
import os
import sys
import time

import numpy as np

import tokenizer as tok
from common import UserError, atomic_write, main_guard, parse_config

DEFAULTS = {
    "input": "tense.txt",
    "out_dir": "data",
    "val_fraction": 0.1,
    "seed": 1337,
    "full_vocab": False,  # True: plain GPT-2 ids (a model with all 50,257 tokens)
    "errors": "strict",  # 'strict': stop at bytes that are not UTF-8; 'replace': use U+FFFD
    "tokenizer": "gpt2",  # 'gpt2' (BPE), 'char' (one id per character) or 'word' (word level)
    "vocab_size": 5000,  # word: at most this many ids, the most frequent words first
    "min_frequency": 2,  # word: rarer words become <unk>
}
BATCH_BYTES = 1 << 22  # lines are read, decoded and tokenized about 4 MB at a time
PROGRESS_BYTES = 8 << 20  # inputs larger than this print their progress


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
                    f"{path} is not UTF-8: byte 0x{chunk[e.start]:02x} at offset {offset + e.start} (line {line}); "
                    f"convert it to UTF-8, or pass --errors=replace to replace bad bytes with U+FFFD"
                ) from None
            offset += len(chunk)
            lines = text.split("\n")  # not splitlines(): only \n ends a line
            if text.endswith("\n"):
                lines.pop()
            yield offset, [line.removesuffix("\r") for line in lines]


def encode_lines(enc, lines, threads):
    """
    GPT-2 ids of every line, each followed by end-of-text, as one uint16 array.
    Fast path: join the lines with "<|endoftext|>" into one text per thread. tiktoken
    splits a text at allowed special tokens before its regex runs, so each line encodes
    exactly as encode_ordinary(line) would, with far less per-call overhead.
    """
    eot_text = tok.ENDOFTEXT
    if any(eot_text in line for line in lines):  # typed in the text: must stay text, go line by line
        per_line = [enc.encode_ordinary(line) + [tok.GPT2_EOT] for line in lines]
        return np.fromiter(itertools.chain.from_iterable(per_line), dtype=np.uint16, count=sum(map(len, per_line)))
    step = -(-len(lines) // threads)
    texts = [eot_text.join(lines[i : i + step]) + eot_text for i in range(0, len(lines), step)]
    encoded = enc.encode_batch(texts, num_threads=threads, allowed_special={eot_text})
    return np.concatenate([np.array(ids, dtype=np.uint16) for ids in encoded] or [np.zeros(0, np.uint16)])


def offset_to_line(path, offset):
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir} ({e.strerror}); choose another with --out_dir=DIR") from None


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    path, out_dir = config["input"], config["out_dir"]
    if not 0.0 < config["val_fraction"] < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {config['val_fraction']}")
    if config["tokenizer"] not in ("gpt2", "char", "word"):
        raise UserError(f"--tokenizer must be gpt2, char or word, got {config['tokenizer']!r}")
    if config["full_vocab"] and config["tokenizer"] != "gpt2":
        raise UserError(f"--full_vocab applies to --tokenizer=gpt2 only (got --tokenizer={config['tokenizer']})")
    if config["tokenizer"] == "word" and not 4 < config["vocab_size"] <= 65536:
        raise UserError(f"--vocab_size must be between 5 and 65536 (4 ids are special tokens), got {config['vocab_size']}")
    if config["errors"] not in ("strict", "replace"):
        raise UserError(f"--errors must be 'strict' or 'replace', got {config['errors']!r}")
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist; pass --input=FILE with a UTF-8 text file")
    size = os.path.getsize(path)
    check_writable(out_dir)

    # Pass 1: check the text decodes, count its lines, hash it; char and word build their vocabulary.
    kind = config["tokenizer"]
    sha, n_lines, counts = hashlib.sha256(), 0, collections.Counter()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    for _, lines in read_batches(path, config["errors"]):
        lines = [line for line in lines if line.strip()]  # blank lines are dropped
        n_lines += len(lines)
        if kind == "char":
            counts.update(itertools.chain.from_iterable(lines))
        elif kind == "word":
            counts.update(itertools.chain.from_iterable(map(tok.Word.pieces, lines)))
    if n_lines == 0:
        raise UserError(f"{path} has no text (it is empty or only whitespace); give it at least a few lines")
    if kind == "char":
        tokenizer = tok.Char.from_counts(counts)
    elif kind == "word":
        tokenizer = tok.Word.from_counts(counts, config["vocab_size"], config["min_frequency"])
    else:
        tokenizer = tok.GPT2()  # made compact after pass 2, once we know which ids the text uses

    # Which lines go to val: a seeded random choice of whole (non-blank) lines.
    rng = np.random.default_rng(config["seed"])
    n_val = max(1, round(n_lines * config["val_fraction"]))
    is_val = np.zeros(n_lines, dtype=bool)
    is_val[rng.choice(n_lines, size=min(n_val, n_lines), replace=False)] = True

    # Pass 2: tokenize a batch of lines at a time (GPT-2: on every core); hold only numpy arrays.
    threads = os.cpu_count() or 1
    parts = {"train": [], "val": []}
    chars = {"train": 0, "val": 0}  # characters per split, a line's end counted as one
    first_line, started = 0, time.time()
    for done_bytes, lines in read_batches(path, config["errors"]):
        lines = [line for line in lines if line.strip()]
        if kind == "gpt2":
            ids = encode_lines(tokenizer.enc, lines, threads)  # every line's tokens, each followed by end-of-text
        else:
            per_line = [tokenizer.encode(line) + [tokenizer.eot] for line in lines]
            ids = np.fromiter(itertools.chain.from_iterable(per_line), dtype=np.uint16, count=sum(map(len, per_line)))
        line_is_val = is_val[first_line : first_line + len(lines)]
        line_chars = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) + 1
        chars["val"] += int(line_chars[line_is_val].sum())
        chars["train"] += int(line_chars[~line_is_val].sum())
        tokens_per_line = np.diff(np.flatnonzero(ids == tokenizer.eot), prepend=-1)  # one end-of-text per line
        to_val = np.repeat(line_is_val, tokens_per_line)
        parts["train"].append(ids[~to_val])
        parts["val"].append(ids[to_val])
        first_line += len(lines)
        if size > PROGRESS_BYTES:
            rate = done_bytes / 1e6 / max(time.time() - started, 1e-9)
            print(f"tokenized {done_bytes / 1e6:.1f} / {size / 1e6:.1f} MB ({100 * done_bytes / size:.0f}%), {rate:.1f} MB/s", flush=True)
    line_counts = {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    data = {split: np.concatenate(arrays) for split, arrays in parts.items()}
    for split, arr in data.items():
        if len(arr) < 2:
            raise UserError(
                f"{path} is too small: its {split} split has {len(arr)} token(s), at least 2 are needed; "
                f"add more lines{' or raise --val_fraction' if split == 'val' else ''}"
            )

    if kind == "gpt2" and not config["full_vocab"]:
        used = np.flatnonzero(np.bincount(np.concatenate(list(data.values())), minlength=tok.GPT2_EOT + 1))
        tokenizer = tok.CompactGPT2.from_used_ids(used.tolist())
        to_compact = np.zeros(tok.GPT2_EOT + 1, dtype=np.uint16)
        to_compact[tokenizer.gpt2_ids] = np.arange(tokenizer.vocab_size, dtype=np.uint16)
        data = {split: to_compact[arr] for split, arr in data.items()}

    meta = {
        **tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot": tokenizer.eot,
        "dtype": "uint16",
        "train_tokens": int(len(data["train"])),
        "val_tokens": int(len(data["val"])),
        "train_lines": line_counts["train"],
        "val_lines": line_counts["val"],
        "train_chars": chars["train"],
        "val_chars": chars["val"],
        "source": os.path.abspath(path),
        "source_sha256": sha.hexdigest(),
        "val_fraction": config["val_fraction"],
        "seed": config["seed"],
    }
    # Each file is replaced atomically; meta.json goes last and records the token counts,
    # so train.py can tell if an interrupted run left .bin files that don't match it.
    try:
        for split, arr in data.items():
            atomic_write(os.path.join(out_dir, f"{split}.bin"), arr.tofile)
        atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir} ({e.strerror}); choose another with --out_dir=DIR") from None
    print(
        f"{path}: {n_lines:,} lines -> train {meta['train_tokens']:,} tokens ({line_counts['train']:,} lines), "
        f"val {meta['val_tokens']:,} tokens ({line_counts['val']:,} lines); "
        f"tokenizer {meta['tokenizer']}, vocab {tokenizer.vocab_size:,}; wrote {out_dir}/train.bin, val.bin, meta.json"
    )


if __name__ == "__main__":
    main_guard(main)
