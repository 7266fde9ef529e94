"""
The datasets of the lm-evaluation-harness tasks beside this file, built from a folder that
prepare.py wrote (data/ by default; `--metadata='{"data_dir": "data/other"}'` for another),
so nothing is downloaded and the text is the one eval.py scores:

- val_lines: the val split's lines (tense_lines: rolling bits per byte, as eval.py's);
- last_words: the same lines cut before their last word (tense_last_word: a loglikelihood,
  as LAMBADA's);
- minimal_pairs: a sentence whose time phrase agrees with its verb beside the same sentence
  in another tense (tense_pairs: multiple choice, as BLiMP's), none of them a training line.

lm_eval imports this file by its path (`!function tense.val_lines` in the YAML), so it puts
the project's folder on sys.path itself to read the split with the project's tokenizer.
"""

import os
import random
import sys

import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tensegpt import grammar  # noqa: E402 - after the path is set
from tensegpt.data import open_split  # noqa: E402
from tensegpt.tokenizer import decode_examples, read_meta  # noqa: E402
from tensegpt.tokenizer import from_meta as tokenizer_from_meta  # noqa: E402


def split_lines(data_dir, split):
    """The texts of a prepared split (each example of the split, without its end-of-text)."""
    meta = read_meta(data_dir)
    return decode_examples(tokenizer_from_meta(meta), open_split(data_dir, split, meta))


def val_lines(data_dir="data", **metadata):
    return {"test": datasets.Dataset.from_list([{"text": line} for line in split_lines(data_dir, "val")])}


def last_words(data_dir="data", **metadata):
    rows = []
    for line in split_lines(data_dir, "val"):
        context, _, word = line.rpartition(" ")
        rows.append({"context": context, "word": " " + word})
    return {"test": datasets.Dataset.from_list(rows)}


def minimal_pairs(data_dir="data", pairs=200, seed=1337, **metadata):
    """A sentence with a time phrase of one tense only, and the same sentence in another tense."""
    rng = random.Random(seed)
    seen = set(split_lines(data_dir, "train"))
    only = {t: [p for p in grammar.TIMES[t] if grammar.PHRASE_TENSES[p] == {t}] for t in grammar.TENSES}
    rows = []
    while len(rows) < pairs:
        subject, person, kind = rng.choice(grammar.SUBJECTS)
        verb, objects, who = rng.choice(grammar.VERBS)
        tense = rng.choice([t for t in grammar.TENSES if only[t]])
        if kind not in who:
            continue
        words = (subject, person, verb, rng.choice(objects))
        form, phrase = rng.choice(["affirmative", "negative"]), rng.choice(only[tense])
        good = grammar.sentence(*words, tense, form, phrase, time_first=True)
        other = rng.choice([t for t in grammar.TENSES if t != tense])
        bad = grammar.sentence(*words, other, form, phrase, time_first=True)
        if good not in seen:
            rows.append({"good": good, "bad": bad, "tense": tense})
    return {"test": datasets.Dataset.from_list(rows)}
