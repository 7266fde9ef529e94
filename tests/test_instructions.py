"""make_tense.py --task=chat's instructions: one right answer each, and held-out phrasing families that never leak."""

import collections
import json
import random

import pytest
from helpers import run_script

from tensegpt import instructions
from tensegpt.grammar import TENSES, TIMES, sentence
from tensegpt.instructions import FRAMES, HELD_OUT, REFUSAL, family_pattern, reads_as_one_tense, request, styles


def every_request_and_answer(cores, asked_only=True):
    """
    The whole instruction space by what a request shows and asks, whatever its wording: ((task, the sentence
    shown, the tense asked for), its answer) for every core, tense, form and time phrase. asked_only: those the
    generator may ask (a follow-up rewrites or negates the last answer, so it is a rewrite or a negation too).
    """
    may = lambda *reading: not asked_only or reads_as_one_tense(*reading)
    for core in cores:
        said = {(t, f): sentence(*core, t, f, "") for t in TENSES for f in ("affirmative", "negative", "question")}
        for tense in TENSES:
            for form in ("affirmative", "negative", "question"):
                shown = said[tense, form]
                # a rewrite keeps the form it is shown: its answer never depends on the tense shown
                for target in TENSES:
                    if target != tense:
                        yield ("rewrite", shown, target), said[target, form]
                if form == "affirmative" and may(core, tense, form):
                    yield ("negative", shown, ""), said[tense, "negative"]
                    yield ("question", shown, ""), said[tense, "question"]
                for time in ["", *TIMES[tense]]:
                    if may(core, tense, form, time):
                        yield ("name", sentence(*core, tense, form, time), ""), tense


def ambiguous(cores, asked_only=True):
    answers = collections.defaultdict(set)
    for key, answer in every_request_and_answer(cores, asked_only):
        answers[key].add(answer)
    return {key: found for key, found in answers.items() if len(found) > 1}


ALL_CORES = instructions.core_list()


def test_every_request_the_generator_may_ask_has_exactly_one_right_answer():
    # every core the generator uses, tense, form and time phrase
    assert ambiguous(ALL_CORES) == {}
    # the space without that rule has requests with two right answers: the rule is what keeps them out
    two = ambiguous([c for c in ALL_CORES if c[0] == "My friends"], asked_only=False)
    assert ("name", "My friends read a book.", "") in two and ("negative", "My friends read a book.", "") in two
    assert ("name", "My friends read a book yesterday.", "") not in two


def test_a_sentence_that_reads_as_two_tenses_is_never_named_negated_or_questioned():
    """'My friends read a book.' is present and past: naming or negating it has two right answers."""
    core = next(c for c in instructions.core_list() if c[0] == "My friends" and c[2].startswith("read "))
    ambiguous_texts = {sentence(*core, t, "affirmative", "") for t in ("present simple", "past simple")}
    assert len(ambiguous_texts) == 1
    rng = random.Random(0)
    for task in ("name", "negative", "question", "two-turn"):
        for _ in range(300):
            messages = [m for m in instructions.conversation(rng, core, task)["messages"] if m["role"] != "system"]
            for i in range(0, len(messages), 2):
                text = ambiguous_texts.copy().pop()
                if task in ("name", "negative", "question"):
                    assert text not in messages[i]["content"], messages
                elif i == 2 and messages[i]["content"] != messages[i + 1]["content"]:
                    # a follow-up asking for a form is never about an answer that reads as two tenses
                    assert not (messages[1]["content"] == text and messages[3]["content"].count(" not ")), messages


def test_each_phrasing_is_found_by_its_own_family_and_a_held_out_one_by_no_other():
    """
    Every frame in every style: the text shows its family's wording; a held-out family's text shows no other
    family's, and no held-out wording is inside another family's text ("now put it into" holds "put it into": both
    are seen). So a held-out family is wording that training never shows.
    """
    patterns = {(task, f): family_pattern(task, f) for task in FRAMES for f in FRAMES[task]}
    fill = {key: values[0] for key, values in instructions.FILL.items()}
    count = 0
    for task, family in patterns:
        frame = FRAMES[task][family]
        for style in styles(frame):
            text = request(frame, style, s="The baby ate an apple.", tense="past perfect", fill=fill)
            found = {key for key, p in patterns.items() if p.search(text)}
            held_out = {key for key in found if key[1] in HELD_OUT[key[0]]}
            if family in HELD_OUT[task]:
                assert found == {(task, family)}, (text, found)
            else:
                assert (task, family) in found and not held_out, (text, found)
            count += 1
    assert count > 20000


def test_the_files_split_sentences_and_hold_out_whole_phrasing_families(tmp_path):
    run_script("make_tense.py", "--task=chat", "--n=3000", "--out=chat.jsonl", cwd=tmp_path)
    train = [json.loads(line) for line in open(tmp_path / "chat.jsonl")]
    val = [json.loads(line) for line in open(tmp_path / "chat_val.jsonl")]
    held_out = [family_pattern(task, f) for task, families in HELD_OUT.items() for f in families]
    users = lambda c: [m["content"] for m in c["messages"] if m["role"] == "user"]
    # no held-out wording in training, in any style; every training conversation says its family is seen
    assert not [text for c in train for text in users(c) for p in held_out if p.search(text)]
    assert {c["phrasing"] for c in train} == {"seen"}
    # half of val is worded by held-out families, and its user turns show them
    phrasing = collections.Counter(c["phrasing"] for c in val)
    assert abs(phrasing["held-out"] - phrasing["seen"]) <= 1
    for c in val:
        if c["phrasing"] == "held-out":
            first = c["family"].split(" + ")[0]
            task = "rewrite" if c["task"] == "two-turn" else c["task"]
            assert family_pattern(task, first).search(users(c)[0]), c
    # the held-out file's sentences are about subjects, verbs and objects training never shows
    said = lambda cs: {m["content"] for c in cs for m in c["messages"] if m["role"] == "assistant"}
    assert not (said(train) & said(val)) - set(TENSES) - {REFUSAL}
    # every task, and an off-task request answered with the fixed reply
    assert {c["task"] for c in train} == set(instructions.TASKS)
    assert all(c["messages"][-1]["content"] == REFUSAL for c in train + val if c["task"] == "off-task")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_generated_conversation_answers_as_the_walk_does(seed):
    """The generator's answers are the walk's: each conversation's request has the one right answer."""
    rng = random.Random(seed)
    cores = instructions.core_list()
    for i in range(300):
        core = rng.choice(cores)
        c = instructions.conversation(rng, core, instructions.TASK_CYCLE[i % len(instructions.TASK_CYCLE)])
        truth = dict(every_request_and_answer([core]))
        messages = [m for m in c["messages"] if m["role"] != "system"]
        if c["task"] == "off-task":
            assert messages[-1]["content"] == REFUSAL
            continue
        asked, reply = messages[0]["content"], messages[1]["content"]
        matches = [answer for (task, shown, target), answer in truth.items() if shown in asked and answer == reply]
        assert matches, (asked, reply)


def test_the_any_verb_pools_hold_no_verb_of_a_held_out_family():
    """The any-verb frames teach that the task is in the rest of the request; a held-out verb there would leak."""
    leading = {FRAMES[task][f].split()[0].lower() for task, families in HELD_OUT.items() for f in families}
    for pool in ("recast", "find", "other"):
        assert not leading & set(instructions.FILL[pool]), pool
    assert {"identify", "convert", "express", "summarize", "form"} <= leading
