"""
A prepared data folder (prepare.py's train.bin, val.bin and meta.json), opened only after
every file agrees with meta.json: the size is a whole number of tokens of meta.json's
dtype, the token counts are the ones it records, and every id is inside the vocabulary.
A file that disagrees (torn by a crash or a copy, or from another folder) is one line that
names it, what was expected and what was found, and says to prepare it again.
"""

import os

import numpy as np

from tensegpt.common import UserError
from tensegpt.tokenizer import read_meta

SPLITS = ("train", "val")
DTYPES = ("uint16",)  # what prepare.py writes; meta.json's "dtype" names it


def open_split(data_dir, split, meta=None):
    """The token ids of one split (a read-only memmap), checked against meta.json, or a UserError."""
    meta = meta or read_meta(data_dir)
    path, meta_path = os.path.join(data_dir, f"{split}.bin"), os.path.join(data_dir, "meta.json")
    again = "run python prepare.py again"
    dtype_name = meta.get("dtype", "uint16")
    if dtype_name not in DTYPES:
        raise UserError(
            f"{meta_path} says the ids are {dtype_name}, but this version reads {', '.join(DTYPES)}: {again}"
        )
    dtype, expected = np.dtype(dtype_name), meta[f"{split}_tokens"]
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing ({meta_path} says it holds {expected:,} tokens): {again}")
    size = os.path.getsize(path)
    if size % dtype.itemsize or size // dtype.itemsize != expected:
        raise UserError(
            f"{path} has {size:,} bytes, but {meta_path} says {expected:,} {dtype_name} tokens "
            f"({expected * dtype.itemsize:,} bytes): the file is torn or from another folder; {again}"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    # an id past the vocabulary would crash in the embedding, or train the padding rows silently
    largest = int(tokens.max())
    if largest >= meta["vocab_size"]:
        raise UserError(
            f"{path} holds token id {largest}, but {meta_path} says the vocabulary has {meta['vocab_size']} ids: "
            f"the files do not belong together; {again}"
        )
    return tokens


def open_marks(data_dir, split, tokens):
    """Chat data: which tokens of a split are trained (its .mask.bin), checked against the ids."""
    path = os.path.join(data_dir, f"{split}.mask.bin")
    again = "run python prepare.py again"
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing (a chat folder marks its trained tokens there): {again}")
    size = os.path.getsize(path)
    if size != len(tokens):
        raise UserError(
            f"{path} has {size:,} marks, but {split}.bin has {len(tokens):,} tokens: one mark per token; "
            f"the files do not belong together; {again}"
        )
    marks = np.fromfile(path, dtype=np.uint8)
    if marks.size and marks.max() > 1:
        raise UserError(f"{path} holds a mark {int(marks.max())}: marks are 0 or 1; {again}")
    return marks


def open_splits(data_dir, block_size):
    """
    ({'train': ids, 'val': ids}, meta.json) of a folder, each split long enough for one
    window. Chat data (meta.json's "chat"): each split is (ids, trained-token marks).
    """
    meta = read_meta(data_dir)
    splits = {split: open_split(data_dir, split, meta) for split in SPLITS}
    if meta.get("chat"):
        return {split: (ids, open_marks(data_dir, split, ids)) for split, ids in splits.items()}, meta
    for split, tokens in splits.items():
        n = len(tokens)
        if n < block_size + 1:
            raise UserError(
                f"the {split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}: "
                f"use --block_size={max(1, n - 1)} or less"
                + (", or prepare with a larger --val_fraction" if split == "val" else ", or prepare more text")
            )
    return splits, meta
