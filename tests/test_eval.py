"""eval.py: the grammar check, bits per byte, the minimal-pairs probe, and its bad inputs."""

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import ROOT, fails, run_script, tense_lines

from tensegpt import grammar


@pytest.fixture(scope="module")
def table():
    return grammar.cores()


def test_the_grammar_accepts_every_line_of_tense_txt(table):
    with open(os.path.join(ROOT, "tense.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    parsed = [grammar.parse(line, table) for line in lines]
    assert all(p is not None and p["agrees"] and p["sensible"] for p in parsed)
    # 70% of the statements with a time phrase put it first (42% of the lines); questions never do
    first = [p for p in parsed if p["time_first"]]
    assert 0.39 < len(first) / len(lines) < 0.45 and all(p["form"] != "question" for p in first)
    assert {p["tense"] for p in parsed} == set(grammar.TENSES)
    counts = [sum(p["tense"] == t for p in parsed) for t in grammar.TENSES]
    # an equal share of the twelve tenses (8,333 or 8,334 each), but for "They read a book." with no time
    # phrase, which is present or past: the parser reads it as present
    assert max(counts) - min(counts) <= 30 and sum(counts) == len(lines)


def test_siblings_repeat_a_sentences_words_in_the_next_tense_on_the_next_line(table):
    def words(line):
        # the sentence without its time phrase and mark: the table's key, whose entry names subject, verb and object
        p = grammar.parse(line, table)
        text = line[:-1]
        if p["time"]:
            text = text[len(p["time"]) + 2 :] if p["time_first"] else text[: -len(p["time"]) - 1]
        subject, _, verb, tense, _, obj = table[text][0]
        return (subject.lower(), verb, obj), p["tense"]

    plain = grammar.generate(3000, 7)
    assert grammar.generate(3000, 7, siblings=0.0) == plain
    lines = grammar.generate(3000, 7, siblings=0.5)
    assert len(set(lines)) == 3000 and all(grammar.parse(line, table)["agrees"] for line in lines)
    read = [words(line) for line in lines]
    pairs = [i for i in range(len(read) - 1) if read[i][0] == read[i + 1][0]]
    # about half the sentences are followed by a sibling (a third of the lines), each in another tense
    assert 0.28 < len(pairs) / len(lines) < 0.38
    assert sum(read[i][1] != read[i + 1][1] for i in pairs) > 0.95 * len(pairs)
    without = [words(line)[0] for line in plain]
    assert sum(a == b for a, b in zip(without, without[1:])) < 0.01 * len(plain)
    counts = [sum(tense == t for _, tense in read) for t in grammar.TENSES]
    assert max(counts) - min(counts) <= 30


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "Yesterday, the baby ate an apple.",
            {"tense": "past simple", "time_first": True, "agrees": True, "sensible": True},
        ),
        (
            "By tomorrow, they will have built a house.",
            {"tense": "future perfect", "agrees": True, "sensible": True},
        ),
        (
            "Yesterday, the baby will eat an apple.",
            {"tense": "future simple", "agrees": False},
        ),  # the wrong tense
        ("The baby ate an apple tomorrow.", {"tense": "past simple", "agrees": False}),
        ("The baby drives a bus every day.", {"sensible": False, "agrees": True}),  # who-does-what
        ("The dog writes a poem.", {"sensible": False, "time": ""}),
        ("They read a book yesterday.", {"tense": "past simple", "agrees": True}),  # read: present or past
        ("They read a book every day.", {"tense": "present simple", "agrees": True}),
        ("the baby drinks some milk on sundays.", None),  # case matters for the GPT-2 and char models
        ("The baby eat an apple.", None),
        ("The baby ate an apple", None),  # no full stop
        ("Did the baby eat an apple.", None),  # a question needs its question mark
        ("The baby ate an apple?", None),
        ("Yesterday the baby ate an apple.", None),  # the comma
        ("Yesterday, The baby ate an apple.", None),
        ("Yesterday, did the baby eat an apple?", None),  # questions keep the time phrase last
        ("The baby ate the bus.", None),  # an object the verb never takes
        ("The baby ate an apple yesterday yesterday.", None),
    ],
)
def test_the_grammar_rejects_each_kind_of_bad_sentence(table, text, expected):
    parsed = grammar.parse(text, table)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None and {k: parsed[k] for k in expected} == expected


def test_lowercase_parsing_for_the_word_tokenizer():
    table = grammar.cores(lowercase=True)
    assert grammar.parse("on sundays, tom eats an apple.", table, lowercase=True)["time"] == "on Sundays"
    assert grammar.parse("the baby eat an apple.", table, lowercase=True) is None


def test_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary_per_token(tiny_run):
    from eval import held_out_loss, load_split
    from tensegpt.checkpoint import load_model

    model, tokenizer, checkpoint = load_model(str(tiny_run / "out" / "trained.pth"))
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: every logit 0, uniform over the padded vocabulary
    val, meta = load_split(str(tiny_run / "data"), "val", checkpoint["tokenizer_meta"])
    report = held_out_loss(model, val, meta, tokenizer, batch_size=4)
    V = model.config.vocab_size
    assert math.isclose(report["val_loss"], math.log(V), rel_tol=1e-5)
    assert math.isclose(report["bits_per_byte"], (len(val) - 1) * math.log2(V) / meta["val_bytes"], rel_tol=1e-5)
    # val_bytes: each line's UTF-8 bytes and its line break
    lines = [line for line in (tiny_run / "corpus.txt").read_text().splitlines()]
    assert meta["val_bytes"] + meta["train_bytes"] == sum(len(line.encode()) + 1 for line in lines)


def test_eval_reports_every_figure_in_range_and_draws_the_probe(trained_run, tmp_path):
    out = run_script(
        "eval.py",
        f"--ckpt={trained_run / 'out' / 'trained.pth'}",
        f"--data_dir={trained_run / 'data'}",
        "--json",
        "--num_samples=48",
        "--time_prompts=24",
        "--probe_per_tense=3",
        f"--picture={tmp_path / 'probe.png'}",
        cwd=tmp_path,
        timeout=300,
    )
    report = json.loads(out.stdout)
    for key in ("grammatical", "tense_agreement", "semantic_errors", "novel", "probe_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["samples"] == 96 and len(report["probe_per_tense"]) == 12  # unconditional and after subjects
    parts = report["correct_by_prompt"]
    assert [parts[k]["samples"] for k in ("unconditional", "after a subject", "after a time phrase")] == [48, 48, 24]
    assert report["correct_sentences"] == min(part["correct"] for part in parts.values())
    for part in parts.values():
        wrong = round((1 - part["correct"]) * part["samples"])
        assert part["correct"] <= part["grammatical"] and len(part["examples_wrong"]) == min(10, wrong)
    assert len(report["time_prompt_per_tense"]) == 12 and 0.0 <= report["time_prompt_agreement"] <= 1.0
    assert report["time_prompts"] == 24  # 2 per tense
    assert len(report["examples_bad_time_prompt"]) <= 20
    assert np.array(report["probe_counts"]).sum(axis=1).tolist() == [3] * 12
    assert report["grammatical"] > 0.25  # 400 steps of a 2-layer model on 10,000 lines already make some sentences
    assert 0 < report["bits_per_byte"] < 3 and math.isclose(report["val_perplexity"], math.exp(report["val_loss"]))
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_a_model_not_trained_on_tense_txt_skips_the_grammar_with_a_note(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(f"line {i}: {'abc ' * (i % 7)}xyz" for i in range(400)) + "\n")
    run_script("prepare.py", "--input=in.txt", cwd=tmp_path)
    run_script("train.py", os.path.join(ROOT, "config", "tiny.py"), "--out_dir=out", "--max_iters=5", cwd=tmp_path)
    result = run_script("eval.py", "--ckpt=out/trained.pth", "--json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert "grammatical" not in report and report["bits_per_byte"] > 0
    assert result.stderr.startswith("note: the grammar check and the probe are for models trained on tense.txt")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num_samples=0"], "error: --num_samples must be at least 1, got 0"),
        (
            ["--temperature=3"],
            "error: --temperature must be between 0 and 2 (below 1e-5: the most likely token); got 3.0",
        ),
        (["--picture=a.jpg"], "error: --picture=a.jpg: cannot write a .jpg file; use one of .png"),
        (["--ckpt=nope.pth"], "error: no checkpoint at nope.pth"),
    ],
)
def test_eval_bad_inputs(tmp_path, args, message):
    assert fails("eval.py", *args, cwd=tmp_path).startswith(message)


def test_eval_on_data_with_another_tokenizer(tiny_run, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(300)) + "\n")
    run_script("prepare.py", "--input=in.txt", "--tokenizer=char", cwd=tmp_path)
    assert fails("eval.py", f"--ckpt={tiny_run / 'out' / 'trained.pth'}", "--data_dir=data", cwd=tmp_path) == (
        "error: data/ was prepared with another tokenizer than the checkpoint's: pass the --data_dir it was trained on"
    )


def test_a_sentence_is_correct_only_when_it_parses_agrees_and_makes_sense():
    from eval import correctness

    texts = [
        "The baby is not drinking some milk.",
        "Every weekend, my brother learned to swim.",
        "The birds were been drinking some milk.",
        "The baby will not sing in the choir next week.",
    ]
    part = correctness(texts, grammar.cores(), lowercase=False)
    assert part["samples"] == 4 and part["correct"] == 0.25 and part["grammatical"] == 0.75
    assert [(w["text"], w["why"]) for w in part["examples_wrong"]] == [
        (texts[1], "a past simple verb after a time phrase of another tense"),
        (texts[2], "not grammatical"),
        (texts[3], "the subject cannot do that"),
    ]
