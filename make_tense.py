"""
Generates tense.txt: English sentences across the twelve tenses, one per line.

    python make_tense.py                      # writes tense.txt (100,000 sentences)
    python make_tense.py --n=50000 --out=big.txt --seed=7
    python make_tense.py --task=chat             # tense_chat.jsonl + tense_chat_val.jsonl (instructions)

Every sentence is built from a subject, a verb with its five forms, an object that
suits the verb, one of twelve tenses, one of three forms (affirmative, negative,
question) and, most of the time, a time phrase that agrees with the tense
("yesterday" only with the past simple, "by tomorrow" only with the future perfect).
A statement puts its time phrase first some of the time, with the comma English uses
("Yesterday, the baby ate an apple."); a question keeps it last. Half of the sentences
(--siblings) are followed by a sibling, the same subject, verb and object in the next tense,
so the text teaches copying words from the context (docs/preparing-data.md). The output is
deterministic for a given seed.

--task=chat writes instructions about the same grammar as conversations, for chat
fine-tuning (docs/chat.md): rewrite a sentence into a named tense, name a sentence's tense,
make it negative or a question, a second turn about the first answer, and one fixed reply to
anything else; every instruction has exactly one right answer. The held-out file's sentences
(subject, verb, object) are never in the training file, in any tense, and half of its
conversations are worded by phrasing families the training file never uses. Each line
carries, beside its messages, its task, phrasing family and whether that family is held out.

The grammar itself (its tables, sentence() and parse()) is tensegpt/grammar.py; the
instructions and their phrasings, tensegpt/instructions.py.
"""

import json
import os
import sys

from tensegpt.common import UserError, atomic_write, check_seed, main_guard, parse_config
from tensegpt.grammar import generate, most_sentences
from tensegpt.instructions import instructions

DEFAULTS = {
    "n": 100000,  # how many distinct sentences
    "seed": 1337,  # the same seed gives the same file (0 to 2**32 - 1)
    "out": "tense.txt",  # the file to write
    "time_first": 0.7,  # share of statements with a time phrase put first (docs/preparing-data.md: why)
    "siblings": 0.5,  # share of sentences followed by one with the same words in another tense (docs/preparing-data.md)
    "task": "sentences",  # 'sentences' (tense.txt) or 'chat' (instruction conversations as .jsonl)
}


def main():
    opts = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_seed(opts)
    most = most_sentences()
    if not 1 <= opts["n"] <= most:
        raise UserError(
            f"--n must be between 1 and {most:,} (the distinct sentences the grammar draws quickly), got {opts['n']}"
        )
    for key in ("time_first", "siblings"):
        if not 0.0 <= opts[key] <= 1.0:
            raise UserError(f"--{key} must be between 0 and 1, got {opts[key]}")
    if opts["task"] == "chat":
        write_instructions(opts)
        return
    if opts["task"] != "sentences":
        raise UserError(f"--task must be sentences or chat, got {opts['task']!r}")
    lines = generate(opts["n"], opts["seed"], opts["time_first"], opts["siblings"])
    atomic_write(opts["out"], lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    print(f"wrote {len(lines):,} sentences to {opts['out']}")


def write_instructions(opts):
    """--task=chat: OUT (training conversations) and OUT_val (held out), one JSON conversation a line."""
    out = "tense_chat.jsonl" if opts["out"] == DEFAULTS["out"] else opts["out"]
    stem, ending = os.path.splitext(out)
    val_out = f"{stem}_val{ending or '.jsonl'}"
    train, val = instructions(opts["n"] if opts["n"] != DEFAULTS["n"] else 30000, opts["seed"])
    if not train or not val:
        raise UserError(
            f"--n={opts['n']} leaves no conversation in train or in val (a tenth is held out): use --n=100 or more"
        )
    for path, conversations in ((out, train), (val_out, val)):
        text = "".join(json.dumps(c) + "\n" for c in conversations)
        atomic_write(path, lambda f, text=text: f.write(text.encode("utf-8")))
    print(f"wrote {len(train):,} conversations to {out} and {len(val):,} held out to {val_out}")


if __name__ == "__main__":
    main_guard(main)
