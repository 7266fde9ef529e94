"""
The BPE trainer measured (docs/tokenizers.md, "A BPE learned from your text"): for each
vocabulary size, the time to learn it (splitting the text and merging) beside Hugging Face
tokenizers' BpeTrainer on the same text with the same pre-tokenization (GPT-2's split,
bytes as characters, pairs seen twice or more), and the bytes per token each gives on the
text; then the compact GPT-2 vocabulary prepare.py cuts for the text against a BPE learned
at the same size.

    python -m tensegpt.bpe_bench --input=tense.txt --sizes=1024,4096,16384
"""

import sys
import time

import numpy as np

from tensegpt import bpe
from tensegpt.common import UserError, main_guard, parse_config
from tensegpt.tokenizer import BPE, GPT2, CompactGPT2

DEFAULTS = {
    "input": "tense.txt",  # the text to learn from (and to measure on)
    "sizes": "1024,4096,16384",  # vocabulary sizes, end-of-text included
}


def hugging_face(texts, vocab_size):
    """(seconds, tokens of the texts) of tokenizers' BpeTrainer at vocab_size."""
    import tokenizers

    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=bpe.MIN_PAIR_COUNT, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    start = time.perf_counter()
    model.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - start
    return seconds, sum(len(e.ids) for e in model.encode_batch(texts))


def ours(texts, vocab_size):
    """(seconds, tokens of the texts, the vocabulary's size) of BPE.learn at vocab_size."""
    start = time.perf_counter()
    tokenizer = BPE.learn(bpe.pieces(texts), vocab_size)
    seconds = time.perf_counter() - start
    return seconds, sum(len(ids) for ids in tokenizer.enc.encode_ordinary_batch(texts)), tokenizer.vocab_size


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    try:
        with open(config["input"], encoding="utf-8") as f:
            texts = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --input={config['input']} ({e.strerror})") from None
    size = sum(len(t.encode()) for t in texts)
    print(f"{config['input']}: {size / 1e6:.2f} MB, {len(texts):,} lines")
    print(f"{'vocab':>7} {'ours s':>8} {'HF s':>7} {'ratio':>6} {'ours B/tok':>11} {'HF B/tok':>9} {'learned':>8}")
    for vocab_size in [int(s) for s in config["sizes"].split(",")]:
        ours_s, ours_n, learned = ours(texts, vocab_size)
        hf_s, hf_n = hugging_face(texts, vocab_size)
        print(f"{vocab_size:>7,} {ours_s:>8.2f} {hf_s:>7.2f} {ours_s / hf_s:>5.1f}x {size / ours_n:>11.3f} "
              f"{size / hf_n:>9.3f} {learned:>8,}")  # fmt: skip
    # the compact GPT-2 vocabulary of the text (prepare.py's default, min frequency 4) against a BPE of its size
    gpt2 = GPT2()
    counts = np.bincount(np.concatenate([gpt2.enc.encode_ordinary(t) for t in texts] or [[]]).astype(np.int64),
                         minlength=50257)  # fmt: skip
    compact = CompactGPT2.from_used_ids(np.flatnonzero(counts >= 4).tolist())
    compact_n = sum(len(ids) for ids in compact.enc.encode_ordinary_batch(texts))
    _, learned_n, learned = ours(texts, compact.vocab_size)
    print(f"compact GPT-2 vocabulary: {compact.vocab_size:,} tokens, {size / compact_n:.3f} bytes per token; "
          f"a BPE learned at that size ({learned:,}): {size / learned_n:.3f}")  # fmt: skip


if __name__ == "__main__":
    main_guard(main)
