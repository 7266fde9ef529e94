"""
The tokenizer files of an export (export.py): this project's tokenizer as a Hugging Face
`tokenizers` BPE that gives the same ids, with the chat template and its special tokens.

GPT-2's BPE and the compact vocabulary cut out of it (tokenizer.CompactGPT2) are both
byte-level BPEs over GPT-2's regex, so both become a `tokenizers` BPE model: the vocabulary
(each token under GPT-2's printable spelling of its bytes, from encoder.json) and the merges.
tiktoken merges any two neighbouring pieces whose joined bytes are a token, the lowest-ranked
token first; a `tokenizers` BPE merges only the pairs its list names, the first-listed first.
So the list names every pair of tokens that joins into a token, ordered by the rank of what it
makes: the same merges in the same order, for any text (tests/test_export.py checks it).

A chat model's four template tokens are special tokens after the vocabulary, and
tokenizer_config.json's chat_template renders a conversation as chat.ChatTokenizer does:
end-of-text, then each turn as <|role|> content <|end|>, then <|assistant|> to ask for an
answer. Char and word vocabularies have no such twin and are refused (see exportable_tokenizer).
"""

import functools
import json
import os

from tiktoken_ext.openai_public import r50k_pat_str

from tensegpt.chat import CHAT_TOKENS
from tensegpt.common import UserError
from tensegpt.tokenizer import (
    ENCODER_JSON_SHA256,
    ENDOFTEXT,
    GPT2_EOT,
    VOCAB_BPE_SHA256,
    gpt2_encoding,
    gpt2_file,
)

# one conversation as ChatTokenizer.encode_conversation writes it, in Jinja (what apply_chat_template runs)
CHAT_TEMPLATE = (
    "{{ '" + ENDOFTEXT + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def exportable_tokenizer(tokenizer_meta):
    """Why a checkpoint's tokenizer has no Hugging Face twin, as a message with the fix, or None."""
    kind = tokenizer_meta["tokenizer"]
    if kind == "char":
        return (
            "its char vocabulary drops the characters it lacks, which no `tokenizers` model does: "
            "to export, prepare the text with --tokenizer=gpt2 and train again"
        )
    if kind == "word":
        return (
            "its word vocabulary lowercases and splits with Python's \\w, which `tokenizers` does not match "
            "character for character: to export, prepare the text with --tokenizer=gpt2 and train again"
        )
    if kind == "gpt2-compact" and tokenizer_meta.get("fallback", "bytes") != "subwords":
        return (
            "its compact vocabulary spells unknown tokens in single bytes (a data folder made before the merges "
            "were kept), which no BPE does: prepare the data again and train again"
        )
    return None


@functools.lru_cache(maxsize=1)
def gpt2_spellings():
    """GPT-2's encoder.json: each token's printable spelling of its bytes -> its GPT-2 id."""
    with open(gpt2_file("encoder.json", ENCODER_JSON_SHA256), encoding="utf-8") as f:
        return json.load(f)


def gpt2_ids_of(tokenizer_meta):
    """The GPT-2 id of each id of the vocabulary, in order (the full vocabulary: GPT-2's own)."""
    if tokenizer_meta["tokenizer"] == "gpt2-compact":
        return list(tokenizer_meta["gpt2_ids"])
    return list(range(GPT2_EOT + 1))


def spell(token):
    """A token's bytes as GPT-2's files write them: each byte as one printable character (encoder.json's)."""
    return "".join(byte_spellings()[b] for b in token)


@functools.lru_cache(maxsize=1)
def byte_spellings():
    gpt2 = gpt2_encoding()
    return {gpt2.decode_single_token_bytes(i)[0]: text for text, i in gpt2_spellings().items() if i < 256}


def bpe_tokenizer_json(tokenizer_meta):
    """tokenizer.json (as a dict) of a gpt2, gpt2-compact or bpe tokenizer, chat tokens included."""
    pattern = tokenizer_meta.get("pattern", r50k_pat_str)
    if tokenizer_meta["tokenizer"] == "bpe":
        tokens = [bytes.fromhex(t) for t in tokenizer_meta["tokens"]]
        vocab = {spell(t): i for i, t in enumerate(tokens)}
        eot = len(tokens)
        vocab[ENDOFTEXT] = eot
    else:
        gpt2 = gpt2_encoding()
        gpt2_ids = gpt2_ids_of(tokenizer_meta)
        eot = gpt2_ids.index(GPT2_EOT)
        tokens = [gpt2.decode_single_token_bytes(g) for g in gpt2_ids if g != GPT2_EOT]
        vocab = {spell(gpt2.decode_single_token_bytes(g)) if g != GPT2_EOT else ENDOFTEXT: i
                 for i, g in enumerate(gpt2_ids)}  # fmt: skip
    if tokenizer_meta["tokenizer"] == "gpt2":
        # GPT-2's own merges, as its merges.txt lists them
        with open(gpt2_file("vocab.bpe", VOCAB_BPE_SHA256), encoding="utf-8") as f:
            merges = [line.split(" ") for line in f.read().split("\n")[1:] if line]
    else:
        # every pair of tokens whose bytes join into a token, ordered by that token's id (its rank)
        kept = set(tokens)
        merges = []
        for token in tokens:
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in kept and right in kept:
                    merges.append([spell(left), spell(right)])
    size = len(vocab)
    specials = [(ENDOFTEXT, eot)]
    if tokenizer_meta.get("chat_tokens"):
        specials += [(text, size + k) for k, text in enumerate(CHAT_TOKENS)]
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for text, i in specials
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer(pattern),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def pre_tokenizer(pattern):
    """GPT-2's split and its bytes as characters (ByteLevel); another split pattern as a Split before it."""
    if pattern == r50k_pat_str:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}  # fmt: skip


def vocab_and_merges(tokenizer_json):
    """vocab.json and merges.txt (the files GPT-2's slow tokenizer reads) of a tokenizer.json, as bytes."""
    model = tokenizer_json["model"]
    merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in model["merges"])
    return json.dumps(model["vocab"], ensure_ascii=False).encode(), merges.encode()


def tokenizer_config(tokenizer_meta, block_size):
    """tokenizer_config.json: which class loads it, the special tokens, and a chat model's template."""
    chat = bool(tokenizer_meta.get("chat_tokens"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "add_prefix_space": False,
        "bos_token": ENDOFTEXT,
        "eos_token": "<|end|>" if chat else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["additional_special_tokens"] = list(CHAT_TOKENS)
        config["chat_template"] = CHAT_TEMPLATE
    return config


def meta_from_folder(folder):
    """
    The tokenizer_meta of a Hugging Face folder's tokenizer.json: GPT-2's (also when the
    folder has none, as GPT-2's original release), or a compact vocabulary cut out of it,
    with chat tokens if it has them. A tokenizer that is not one of those is refused: its
    ids would mean other tokens here.
    """
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return {"tokenizer": "gpt2"}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        vocab, merges = saved["model"]["vocab"], saved["model"]["merges"]
        added = {token["content"]: token["id"] for token in saved.get("added_tokens", [])}
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{path} is not a tokenizers BPE file ({e.__class__.__name__}: {e})") from None
    gpt2_id = gpt2_spellings()
    order = sorted(vocab, key=vocab.get)
    if any(text not in gpt2_id for text in order) or [vocab[t] for t in order] != list(range(len(order))):
        raise UserError(f"{path} is not GPT-2's byte-level BPE or a vocabulary cut out of it: it cannot be read here")
    gpt2_ids = [gpt2_id[text] for text in order]
    if gpt2_ids == list(range(GPT2_EOT + 1)):
        meta = {"tokenizer": "gpt2"}
    else:
        meta = {"tokenizer": "gpt2-compact", "gpt2_ids": gpt2_ids, "fallback": "subwords"}
    if all(added.get(text) == len(order) + k for k, text in enumerate(CHAT_TOKENS)):
        meta["chat_tokens"] = list(CHAT_TOKENS)
    expected = bpe_tokenizer_json(meta)["model"]["merges"]
    if [list(pair) if not isinstance(pair, str) else pair.split(" ") for pair in merges] != expected:
        raise UserError(f"{path} has the vocabulary of a GPT-2 BPE but other merges: it would split words otherwise")
    return meta
