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
import regex

from tensegpt import bpe
from tensegpt import tokenizer as tok
from tensegpt.chat import ChatTokenizer, is_chat_file, numbered_contents, read_records
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
    "tokenizer": "gpt2",  # 'gpt2' (GPT-2's BPE), 'bpe' (a BPE learned from the train split), 'char' or 'word'
    "vocab_size": 5000,  # word: at most this many ids, the most frequent words first; bpe: the tokens to learn
    "split_pattern": "",  # bpe: the regex that cuts text into pieces before merging; empty: GPT-2's
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
                    f"{path} is not UTF-8: byte 0x{chunk[e.start]:02x} at offset {offset + e.start} (line {line}); "
                    "convert it to UTF-8, or pass --errors=replace to replace bad bytes with U+FFFD"
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
    kind, example = config["tokenizer"], config["example"]
    if not 0.0 < config["val_fraction"] < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {config['val_fraction']}")
    if example not in ("line", "paragraph", "file"):
        raise UserError(f"--example must be line, paragraph or file, got {example!r}")
    if config["split"] not in ("auto", "random", "last"):
        raise UserError(f"--split must be auto, random or last, got {config['split']!r}")
    if example == "file" and config["split"] == "random":
        raise UserError(
            "--example=file is one stream, so its val split is the end of the text: use --split=last (or auto)"
        )
    if kind not in ("gpt2", "bpe", "char", "word"):
        raise UserError(f"--tokenizer must be gpt2, bpe, char or word, got {kind!r}")
    if kind == "bpe" and not 257 < config["vocab_size"] <= 65536:
        size = config["vocab_size"]
        raise UserError(
            f"--vocab_size must be between 258 and 65536 (256 bytes and end-of-text come first), got {size}"
        )
    if config["split_pattern"] and kind != "bpe":
        raise UserError("--split_pattern applies to --tokenizer=bpe only (the others split as they were made to)")
    if config["split_pattern"]:
        try:
            tok.BPE([bytes([b]) for b in range(256)], config["split_pattern"])
        except (ValueError, regex.error) as e:
            raise UserError(f"--split_pattern={config['split_pattern']!r} is not a regular expression: {e}") from None
    if config["full_vocab"] and kind != "gpt2":
        raise UserError(f"--full_vocab applies to --tokenizer=gpt2 only (got --tokenizer={kind})")
    if kind == "word" and not 4 < config["vocab_size"] <= 65536:
        size = config["vocab_size"]
        raise UserError(f"--vocab_size must be between 5 and 65536 (4 ids are special tokens), got {size}")
    if config["min_frequency"] < 0:
        frequency = config["min_frequency"]
        raise UserError(f"--min_frequency must be 1 or more (0: the tokenizer's default), got {frequency}")
    if kind not in ("word", "bpe") and config["vocab_size"] != DEFAULTS["vocab_size"]:
        smaller = " (--min_frequency makes the compact one smaller)" if kind == "gpt2" else ""
        raise UserError(
            f"--vocab_size applies to --tokenizer=word and bpe; a {kind} vocabulary is what the text uses{smaller}"
        )
    if config["min_frequency"] and (kind in ("char", "bpe") or config["full_vocab"]):
        keeps = "char keeps every character of the text"
        if kind == "bpe":
            keeps = "bpe merges every pair seen twice or more, up to --vocab_size"
        if config["full_vocab"]:
            keeps = "--full_vocab keeps all of GPT-2's tokens"
        raise UserError(f"--min_frequency applies to the compact gpt2 vocabulary and to --tokenizer=word: {keeps}")
    if config["errors"] not in ("strict", "replace"):
        raise UserError(f"--errors must be 'strict' or 'replace', got {config['errors']!r}")
    if config["input"] == "":
        raise UserError("--input is empty: pass --input=FILE with a UTF-8 text file")
    if config["val_input"] and not (is_chat_file(config["input"]) and is_chat_file(config["val_input"])):
        raise UserError("--val_input holds the held-out conversations of a .jsonl --input: give both as .jsonl files")
    if config["vocab_from"] and (kind != "gpt2" or config["full_vocab"]):
        raise UserError(
            "--vocab_from takes the whole vocabulary of the folder or checkpoint it names: "
            "leave out --tokenizer and --full_vocab"
        )
    check_seed(config)
    if os.path.isdir(config["input"]):
        raise UserError(f"--input={config['input']} is a folder: pass --input=FILE with a UTF-8 text file")
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
    check_writable_folder(out_dir, "out_dir")

    # Pass 1: check the text decodes, count its examples, hash it; char and word count what their vocabulary holds.
    n_examples, counts, lines, open_lines, has_text = 0, collections.Counter(), 0, 0, False
    for _, examples in read_examples(path, config["errors"], example):
        n_examples += len(examples)
        has_text = has_text or any(not e.isspace() for e in examples if e)
        if kind in ("char", "word"):
            counts.update(vocabulary_units(kind, examples))
        if example == "line":
            lines += len(examples)
            open_lines += sum(not line.rstrip().endswith(SENTENCE_END) for line in examples)
    noun = {"line": "lines", "paragraph": "paragraphs", "file": "lines"}[example]
    # --example=file keeps blank lines as examples: count only text
    if not has_text:
        raise UserError(f"{path} has no text (it is empty or only whitespace); give it at least a few lines")
    if n_examples < 2:
        raise UserError(
            f"{path} is too small: it has 1 {noun[:-1]}, and train and val need at least one each; add more {noun}"
        )
    if config["vocab_from"]:
        # a paragraph's or a stream's line breaks are text
        line_end = "" if example == "line" else "\n"
        tokenizer = vocabulary_from(config["vocab_from"], numbered_lines(path, config["errors"], line_end))
    elif kind == "gpt2":
        # made compact after the train split, once we know which ids it uses
        tokenizer = tok.GPT2()
    elif kind == "char" or kind == "word":
        tokenizer = new_vocabulary(config, counts, path)
    if lines >= 20 and open_lines > lines / 2:
        print(
            f"hint: {100 * open_lines // lines}% of the lines of {path} end mid-sentence, as wrapped prose does; "
            "with --example=line each line is a separate example. For a book use --example=paragraph (or file)",
            file=sys.stderr,
        )

    is_val = choose_val(n_examples, config, stream=example == "file")
    if kind == "bpe" and not config["vocab_from"]:
        # learned from the train split alone: val stays text the tokenizer never saw
        tokenizer = new_vocabulary(config, train_pieces(path, config, is_val), path)

    # Pass 2 tokenizes the train examples, pass 3 the val ones with the finished tokenizer (the
    # compact vocabulary is the train split's): a batch at a time, GPT-2 on every core.
    data, counted = {}, {}
    data["train"], counted["train"] = tokenize_split(path, config["errors"], example, is_val, "train", tokenizer)
    if kind == "gpt2" and not config["full_vocab"] and not config["vocab_from"]:
        gpt2_counts = np.bincount(data["train"], minlength=tok.GPT2_EOT + 1)
        tokenizer = new_vocabulary(config, gpt2_counts, path)
        to_compact = np.full(tok.GPT2_EOT + 1, -1, dtype=np.int64)
        to_compact[tokenizer.gpt2_ids] = np.arange(tokenizer.vocab_size)
        if (to_compact[np.flatnonzero(gpt2_counts)] >= 0).all():
            # the same tokens: the compact BPE encodes them alike
            data["train"] = to_compact[data["train"]].astype(np.uint16)
        else:
            # rarer tokens than --min_frequency now split into pieces seen elsewhere: encode again
            if os.path.getsize(path) > PROGRESS_BYTES:
                rare = int((to_compact[np.flatnonzero(gpt2_counts)] < 0).sum())
                print(f"train: encoding again with the compact vocabulary ({rare:,} rarer GPT-2 tokens)", flush=True)
            data["train"], _ = tokenize_split(path, config["errors"], example, is_val, "train", tokenizer)
    data["val"], counted["val"] = tokenize_split(path, config["errors"], example, is_val, "val", tokenizer)

    meta = {
        **common_meta(tokenizer, config, path),
        "train_tokens": int(len(data["train"])),
        "val_tokens": int(len(data["val"])),
        # the number of examples (named lines, the one kind of example the first data folders had)
        "train_lines": counted["train"]["examples"],
        "val_lines": counted["val"]["examples"],
        "train_chars": counted["train"]["chars"],
        "val_chars": counted["val"]["chars"],
        # UTF-8 bytes of the text: for bits per byte
        "train_bytes": counted["train"]["bytes"],
        "val_bytes": counted["val"]["bytes"],
        "example": example,
        "split": "last" if config["split"] == "last" or example == "file" else "random",
    }
    write_outputs(out_dir, {"train.bin": data["train"], "val.bin": data["val"]}, meta)
    print(
        f"{path}: {n_examples:,} {noun} -> train {meta['train_tokens']:,} tokens ({meta['train_lines']:,} {noun}), "
        f"val {meta['val_tokens']:,} tokens ({meta['val_lines']:,} {noun}); "
        f"tokenizer {meta['tokenizer']}, vocab {tokenizer.vocab_size:,}; wrote {out_dir}/train.bin, val.bin, meta.json"
    )


def prepare_chat(config):
    """
    A JSONL file of conversations -> train.bin / val.bin (the template's token ids),
    train.mask.bin / val.mask.bin (1 where the loss counts: assistant turns) and meta.json.
    Whole conversations go to train or val: --val_input, or a val_fraction of them (--split).
    """
    path, out_dir, kind = config["input"], config["out_dir"], config["tokenizer"]
    check_writable_folder(out_dir, "out_dir")
    # (messages, tags) of each conversation
    records = {"train": read_records(path)}
    if config["val_input"]:
        records["val"] = read_records(config["val_input"])
    else:
        every = records.pop("train")
        if len(every) < 2:
            raise UserError(f"{path} holds 1 conversation; train and val need at least one each: add more")
        is_val = choose_val(len(every), config)
        records = {split: [r for r, v in zip(every, is_val) if v == (split == "val")] for split in ("train", "val")}
    conversations = {split: [messages for messages, _ in rs] for split, rs in records.items()}
    val_tags = [tags for _, tags in records["val"]]

    # the vocabulary: the base model's (--vocab_from), or built from the train conversations' text
    if config["vocab_from"]:
        base = vocabulary_from(config["vocab_from"], numbered_contents(path, config["val_input"]))
    else:
        texts = [m["content"] for c in conversations["train"] for m in c]
        if kind == "bpe":
            counts = bpe.pieces(texts, config["split_pattern"] or bpe.GPT2_PATTERN)
        elif kind != "gpt2":
            counts = collections.Counter(vocabulary_units(kind, texts))
        else:
            counts = np.bincount(tok.encode_examples(tok.GPT2(), texts), minlength=tok.GPT2_EOT + 1)
        base = new_vocabulary(config, counts, path)
    tokenizer = ChatTokenizer(base)
    check_fits_uint16(tokenizer, path)

    meta = {**common_meta(tokenizer, config, path, config["val_input"]), "chat": True}
    outputs = {}
    for split, convs in conversations.items():
        pairs = [tokenizer.encode_conversation(c) for c in convs]
        outputs[f"{split}.bin"] = np.fromiter(itertools.chain.from_iterable(p[0] for p in pairs), dtype=np.uint16)
        outputs[f"{split}.mask.bin"] = np.fromiter(itertools.chain.from_iterable(p[1] for p in pairs), dtype=np.uint8)
        text_bytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) + 1 for c in convs for m in c)
        meta[f"{split}_tokens"] = len(outputs[f"{split}.bin"])
        meta[f"{split}_conversations"] = len(convs)
        meta[f"{split}_bytes"] = text_bytes
    meta["example"] = "conversation"
    meta["split"] = "file" if config["val_input"] else ("last" if config["split"] == "last" else "random")
    if any(val_tags):
        # each val conversation's other keys (make_tense.py's task and phrasing family), for eval.py's groups
        text = "".join(json.dumps(t) + "\n" for t in val_tags)
        atomic_write(os.path.join(out_dir, "val.tags.jsonl"), lambda f: f.write(text.encode("utf-8")))
        meta["val_tags"] = "val.tags.jsonl"
    write_outputs(out_dir, outputs, meta)
    print(
        f"{path}: {meta['train_conversations']:,} conversations -> train {meta['train_tokens']:,} tokens, "
        f"val {meta['val_tokens']:,} tokens ({meta['val_conversations']:,} conversations); "
        f"tokenizer {meta['tokenizer']} with chat tokens, vocab {tokenizer.vocab_size:,}; "
        f"wrote {out_dir}/train.bin, val.bin, their .mask.bin, meta.json"
    )


# The steps both stories share: which examples are held out, the vocabulary, meta.json, writing.


def choose_val(n, config, stream=False):
    """A bool per example, True for val: a seeded random val_fraction, or the last ones (--split=last, streams)."""
    n_val = min(n - 1, max(1, round(n * config["val_fraction"])))
    is_val = np.zeros(n, dtype=bool)
    if config["split"] == "last" or stream:
        is_val[n - n_val :] = True
    else:
        is_val[np.random.default_rng(config["seed"]).choice(n, size=n_val, replace=False)] = True
    return is_val


def train_pieces(path, config, is_val):
    """How often each piece (bpe.pieces) of the train split's examples occurs: what a bpe vocabulary learns from."""
    counts, first = collections.Counter(), 0
    for _, examples in read_examples(path, config["errors"], config["example"]):
        mine = [e for e, v in zip(examples, is_val[first : first + len(examples)]) if not v]
        first += len(examples)
        counts.update(bpe.pieces(mine, config["split_pattern"] or bpe.GPT2_PATTERN))
    return counts


def vocabulary_units(kind, texts):
    """What a char or word vocabulary gives ids to, one item per occurrence in texts (to count)."""
    pieces = texts if kind == "char" else map(tok.Word.pieces, texts)
    return itertools.chain.from_iterable(pieces)


def new_vocabulary(config, counts, path):
    """
    The --tokenizer built from counts: of characters (char) or words (word), or GPT-2 ids
    (gpt2: the compact vocabulary keeps the ids used at least --min_frequency times).
    """
    kind = config["tokenizer"]
    min_frequency = config["min_frequency"] or MIN_FREQUENCY.get(kind)
    if kind == "bpe":
        started = time.time()
        tokenizer = tok.BPE.learn(counts, config["vocab_size"], config["split_pattern"] or bpe.GPT2_PATTERN)
        print(
            f"bpe: learned {tokenizer.vocab_size - 257:,} merges from {len(counts):,} distinct pieces in "
            f"{time.time() - started:.1f}s (vocab {tokenizer.vocab_size:,}"
            + (f"; no pair is seen twice past that, of the {config['vocab_size']:,} asked" if
               tokenizer.vocab_size < config["vocab_size"] else "") + ")",
            flush=True,
        )  # fmt: skip
    elif kind == "char":
        tokenizer = tok.Char.from_counts(counts)
    elif kind == "word":
        tokenizer = tok.Word.from_counts(counts, config["vocab_size"], min_frequency)
    elif config["full_vocab"]:
        tokenizer = tok.GPT2()
    else:
        tokenizer = tok.CompactGPT2.from_used_ids(np.flatnonzero(counts >= min_frequency).tolist())
    check_fits_uint16(tokenizer, path)
    return tokenizer


def check_fits_uint16(tokenizer, path):
    """train.bin holds uint16 ids: a vocabulary of more than 65,536 tokens is refused before anything is written."""
    if tokenizer.vocab_size > 65536:
        fix = "use --tokenizer=gpt2" if tokenizer.name == "char" else "use a smaller --vocab_size"
        raise UserError(
            f"{path} needs {tokenizer.vocab_size:,} {tokenizer.name} token ids with end-of-text, "
            f"more than the 65,536 that uint16 ids can hold: {fix}"
        )


def vocabulary_from(path, numbered_texts):
    """The tokenizer (no chat tokens) of a data folder, checkpoint or export (--vocab_from); it must spell the texts."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from tensegpt.hf_tokenizer import meta_from_folder  # a Hugging Face folder export.py wrote

        meta = meta_from_folder(path)
    elif os.path.isdir(path):
        meta = tok.read_meta(path)
    else:
        from tensegpt import checkpoint  # imports torch: only here

        hint = "pass the data folder or the trained.pth of the model to fine-tune"
        meta = checkpoint.load(path, missing_hint=hint)["tokenizer_meta"]
    tokenizer = tok.base_from_meta(meta)
    tok.check_spelled(tokenizer, numbered_texts, path)
    return tokenizer


def common_meta(tokenizer, config, *sources):
    """meta.json's fields that say how the ids were made: the tokenizer, the source files and the split's settings."""
    return {
        **tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot": tokenizer.eot,
        "dtype": "uint16",
        "source": os.path.abspath(sources[0]),
        "source_sha256": sha256_of(*sources),
        "val_fraction": config["val_fraction"],
        "seed": config["seed"],
        **({"vocab_from": config["vocab_from"]} if config["vocab_from"] else {}),
    }


def write_outputs(out_dir, arrays, meta):
    """
    Each file is replaced atomically; meta.json goes last and records the token counts,
    so train.py can tell if an interrupted run left .bin files that don't match it.
    """
    for name, array in arrays.items():
        atomic_write(os.path.join(out_dir, name), array.tofile)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


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


if __name__ == "__main__":
    main_guard(main)
