"""
A run that memorises its text is told, once, with the remedies; --early_stop=N stops it after
N evaluations without a better val loss; the line before training sets the data against the
model and the plan.
"""

import os

import pytest
import torch
from helpers import ROOT, fails, run_script, tense_lines

from tensegpt.overfitting import Overfitting, data_budget


def evaluations(watch, pairs):
    """Feed (train, val) losses to watch as train.py does, every 100 iterations; the lines it says."""
    said, best = [], watch.best[1] if watch.best else float("inf")
    start = watch.best[0] // 100 + watch.since_best + 1 if watch.best else 1
    for i, (train, val) in enumerate(pairs, start=start):
        said += watch.after(i * 100, {"train": train, "val": val}, val < best)
        best = min(best, val)
    return said


def test_memorising_is_said_once_after_three_evaluations_without_a_better_val_loss():
    watch = Overfitting(0, "out/trained.pth")
    said = evaluations(watch, [(5.0, 5.1), (4.0, 4.4), (3.5, 4.5), (3.0, 4.6), (2.5, 4.7), (2.0, 4.9)])
    assert len(said) == 1 and not watch.stop()
    assert said[0].startswith(
        "val loss has not beaten its best (4.4000 at iteration 200) for 3 evaluations while train loss fell from "
        "4.0000 to 2.5000: the model is memorising its training text. out/trained.pth keeps the best model; "
        "remedies: more data, dropout (--dropout=0.1), a smaller model (--n_layer, --n_embd), fewer steps "
        "(--max_iters=200), or --early_stop=3"
    )
    # a new best starts the count again; the run was told already
    assert evaluations(watch, [(1.9, 4.3), (1.8, 4.4), (1.7, 4.5), (1.6, 4.6)]) == []


def test_a_plateau_where_train_loss_stalls_too_is_not_called_memorising():
    assert evaluations(Overfitting(0, "t.pth"), [(4.0, 4.4), (4.1, 4.5), (4.05, 4.45), (4.2, 4.6)]) == []


def test_early_stop_comes_after_n_evaluations_without_a_better_val_loss():
    watch = Overfitting(2, "t.pth")
    said = evaluations(watch, [(4.0, 4.4), (3.9, 4.41)])
    assert said == [] and not watch.stop()
    said = evaluations(watch, [(3.8, 4.42)])
    assert watch.stop() and said == [
        "early stop: 2 evaluations without a better val loss than 4.4000 (iteration 100), --early_stop=2"
    ]
    # the count survives a resume
    again = Overfitting(2, "t.pth")
    again.restore(watch.state())
    assert again.stop() and again.state() == watch.state()


def test_the_plan_line_counts_tokens_per_parameter_and_epochs():
    config = {"batch_size": 16, "block_size": 128, "grad_accum": 1, "max_iters": 2500}
    assert data_budget(1_059_496, 890_000, config) == (
        "data: 1,059,496 training tokens for 0.89M parameters (1.2 per parameter); 2,500 steps x 2,048 tokens "
        "read them 4.8 times"
    )
    assert data_budget(300_000, 890_000, config).endswith(
        "read them 17.1 times (after this many passes a model tends to memorise its text: watch val loss, and see "
        "docs/training.md, 'Your own text')"
    )


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """60 tense.txt lines: a model of 0.2M parameters memorises them in a few hundred steps."""
    folder = tmp_path_factory.mktemp("small_text")
    (folder / "corpus.txt").write_text("\n".join(tense_lines(60)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=corpus.txt", "--val_fraction=0.2", cwd=folder)
    return folder


def test_train_py_says_it_is_memorising_and_stops_early_at_its_best(small_text):
    tiny = os.path.join(ROOT, "config", "tiny.py")
    out = run_script("train.py", tiny, "--n_embd=64", "--max_iters=1500", "--eval_interval=25", "--early_stop=4",
                     "--learning_rate=1e-2", "--out_dir=out", cwd=small_text, timeout=300).stdout  # fmt: skip
    assert "read them" in out and "times (after this many passes a model tends to memorise" in out
    assert out.count("the model is memorising its training text") == 1, out
    assert "early stop: 4 evaluations without a better val loss" in out
    saved = torch.load(small_text / "out" / "last.pth", weights_only=True)
    best = torch.load(small_text / "out" / "trained.pth", weights_only=True)
    assert saved["iter_num"] < 1500 and saved["iter_num"] == best["iter_num"] + 4 * 25
    assert saved["overfitting"]["since_best"] == 4


def test_early_stop_must_not_be_negative(tmp_path):
    error = fails("train.py", "--early_stop=-1", cwd=tmp_path)
    assert error == "error: config key early_stop must not be negative, got -1"
