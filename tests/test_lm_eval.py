"""
lm-evaluation-harness (lm_eval, as a user runs it) against a live serve.py on a loopback
port, on the project's own tasks (lm_eval_tasks/: built from the prepared data, nothing
downloaded), with no tokenizer argument: every number it reports is held to the one the
model's own log-likelihoods give, computed directly.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, Server

from tensegpt.checkpoint import load_model

pytestmark = pytest.mark.slow
TASKS = ["tense_lines", "tense_last_word", "tense_pairs"]


@pytest.fixture(scope="module")
def lm_eval_run(trained_run, tmp_path_factory):
    """lm_eval's results and logged samples for the three tasks, run against serve.py."""
    folder = tmp_path_factory.mktemp("lm_eval")
    server = Server(trained_run / "out" / "trained.pth", "--model_name=tense")
    try:
        command = [
            sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model=tense,base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1",
            "--tasks", ",".join(TASKS), "--include_path", os.path.join(ROOT, "lm_eval_tasks"),
            "--metadata", json.dumps({"data_dir": str(trained_run / "data"), "pairs": 60}),
            "--limit", "60", "--log_samples", "--output_path", str(folder),
        ]  # fmt: skip
        offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run(command, cwd=folder, env=offline, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    finally:
        server.stop()
    assert "Using remote tokenizer" in run.stderr + run.stdout, "lm_eval did not find the tokenizer by itself"
    results = json.load(open(glob.glob(str(folder / "**" / "results_*.json"), recursive=True)[0]))["results"]
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(folder / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return results, samples


@pytest.fixture(scope="module")
def own(trained_run):
    """log p(continuation | context) and whether it is the greedy choice, from the model itself."""
    model, tokenizer, _ = load_model(str(trained_run / "out" / "trained.pth"))

    @torch.no_grad()
    def loglikelihood(context, continuation):
        # lm_eval's split: the whole text encoded, the context's own tokens first; an empty context is end-of-text
        if context:
            context_ids = tokenizer.encode(context)
            ids = context_ids + tokenizer.encode(context + continuation)[len(context_ids) :]
        else:
            context_ids = [tokenizer.eot]
            ids = context_ids + tokenizer.encode(continuation)
        logprobs = torch.log_softmax(model(torch.tensor([ids]), logits_at=torch.arange(len(ids)))[0].float(), dim=-1)
        span = range(len(context_ids), len(ids))
        total = sum(float(logprobs[i - 1, ids[i]]) for i in span)
        return total, all(int(logprobs[i - 1].argmax()) == ids[i] for i in span)

    return loglikelihood


def test_lm_evals_rolling_bits_per_byte_is_the_models_own(lm_eval_run, own):
    results, samples = lm_eval_run
    lines = [s["doc"]["text"] for s in samples["tense_lines"]]
    assert len(lines) == 60
    nats = 0.0
    for sample, line in zip(samples["tense_lines"], lines):
        expected, _ = own("", line)
        # lm_eval logs a rolling document's log-likelihood as its first response
        assert float(sample["filtered_resps"][0]) == pytest.approx(expected, abs=1e-3), line
        nats -= expected
    bits_per_byte = nats / math.log(2) / sum(len(line.encode()) for line in lines)
    assert results["tense_lines"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-4)


def test_lm_evals_loglikelihood_and_greedy_match_are_the_models_own(lm_eval_run, own):
    results, samples = lm_eval_run
    hits = []
    for sample in samples["tense_last_word"]:
        (context, continuation), (logprob, greedy) = sample["arguments"]["gen_args_0"].values(), sample["resps"][0][0]
        expected, expected_greedy = own(context, continuation)
        assert float(logprob) == pytest.approx(expected, abs=1e-3), (context, continuation)
        assert greedy == expected_greedy or str(greedy) == str(expected_greedy), (context, continuation)
        hits.append(expected_greedy)
    assert results["tense_last_word"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_lm_evals_minimal_pairs_accuracy_is_the_models_own(lm_eval_run, own):
    results, samples = lm_eval_run
    right = []
    for sample in samples["tense_pairs"]:
        good, bad = own("", sample["doc"]["good"])[0], own("", sample["doc"]["bad"])[0]
        told = [float(r[0][0]) for r in sample["resps"]]
        assert told == pytest.approx([good, bad], abs=1e-3), sample["doc"]
        right.append(good > bad)
    assert results["tense_pairs"]["acc,none"] == pytest.approx(sum(right) / len(right))
    # the model trained on tense.txt prefers the agreeing tense far more often than chance
    assert sum(right) / len(right) > 0.75
