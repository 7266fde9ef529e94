"""What a learner sees: streaming, the prompt loop, temperatures, beam search, scores and pictures."""

import os
import re
import struct
import sys

import pytest
import torch
from helpers import ROOT, run_script

from model import GPT, GPTConfig, penalize_repetition
from sample import score_text
from tensegpt.checkpoint import load_model
from tensegpt.decoding import beam_search


def png_size(path):
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_streamed_output_is_the_same_text(tiny_run):
    args = [
        "--ckpt=out/trained.pth",
        "--start=The baby is",
        "--num_samples=2",
        "--max_new_tokens=20",
        "--seed=4",
    ]
    plain = run_script("sample.py", *args, cwd=tiny_run).stdout
    streamed = run_script("sample.py", *args, "--stream=True", cwd=tiny_run).stdout
    assert streamed == plain and plain.startswith("The baby is")


def test_generate_stream_yields_one_token_per_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.zeros((1, 2), dtype=torch.long)
    steps = model.generate_stream(prompt, 10, greedy=True)
    first = next(steps)  # available before the rest is computed
    rest = list(steps)
    assert first.shape == (1, 1) and len(rest) == 9
    assert torch.equal(torch.cat([prompt, first, *rest], dim=1), model.generate(prompt, 10, greedy=True))


def test_interactive_loop_through_a_pipe(tiny_run):
    commands = (
        "The baby is\n/temperature 0.5\n/top_k 5\n/greedy\n/settings\nShe has\n/temperature -1\n"
        "/bogus\n/help\n/quit\nnever read\n"
    )
    result = subprocess_run(
        tiny_run,
        ["--ckpt=out/trained.pth", "--interactive", "--num_samples=1", "--max_new_tokens=10"],
        commands,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    replies = re.split(r"(?<=\n)> ", result.stdout)  # "> " at the start of a line is the prompt
    assert replies[0].startswith("type a prompt")
    assert replies[1].startswith("The baby is")
    assert replies[2:5] == ["temperature = 0.5\n", "top_k = 5\n", "greedy is on\n"]
    assert replies[5].startswith("temperature=0.5, top_k=5, top_p=1.0, greedy=True")
    assert replies[6].startswith("She has")
    assert replies[7] == "error: --temperature must be between 0 and 2 (below 1e-5: the most likely token); got -1.0\n"
    assert replies[8] == "unknown command /bogus; /help lists them\n"
    assert replies[9].startswith("commands: /temperature X")
    assert len(replies) == 11 and "never read" not in result.stdout  # /quit left the loop


def test_interactive_ends_cleanly_on_end_of_input(tiny_run):
    result = subprocess_run(tiny_run, ["--ckpt=out/trained.pth", "--interactive"], "")
    assert result.returncode == 0 and result.stderr == "" and result.stdout.endswith("> \n")


def subprocess_run(cwd, args, stdin_text):
    import subprocess

    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *args],
        cwd=cwd,
        input=stdin_text,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_temperature_tour_shows_each_temperature(tiny_run):
    out = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        "--start=The baby is",
        "--temperatures=0.2,0.8,1.2",
        "--num_samples=2",
        "--max_new_tokens=15",
        cwd=tiny_run,
    ).stdout
    blocks = out.rstrip("\n").split("\n\n")
    assert len(blocks) == 2
    for block in blocks:
        lines = block.split("\n")
        assert [line[:18] for line in lines] == [
            "temperature 0.2 | ",
            "temperature 0.8 | ",
            "temperature 1.2 | ",
        ]
        assert all(line[18:].startswith("The baby is") for line in lines)


def test_beam_search_scores_at_least_as_well_as_greedy(trained_run):
    model, tokenizer, _ = load_model(str(trained_run / "out" / "trained.pth"))
    for prompt in ("The baby is", "Will they", "My sister had"):
        idx = torch.tensor([tokenizer.encode(prompt)])
        greedy = model.generate(idx, 30, greedy=True, stop_token=tokenizer.eot)[0, idx.size(1) :].tolist()
        greedy_logprob = continuation_logprob(model, idx[0].tolist(), greedy)
        new, logprob = beam_search(model, idx, 5, 30, stop_token=tokenizer.eot)
        assert logprob == pytest.approx(continuation_logprob(model, idx[0].tolist(), new), abs=1e-4)
        assert logprob / len(new) >= greedy_logprob / len(greedy) - 1e-6
    out = run_script("sample.py", "--ckpt=out/trained.pth", "--start=The baby is", "--beam=4", cwd=trained_run).stdout
    text, report = out.rstrip("\n").split("\n")
    assert text.startswith("The baby is") and report.startswith("beam search, 4 beams: log-probability -")


@torch.no_grad()
def continuation_logprob(model, prompt, new):
    ids = torch.tensor([prompt + new])
    logprobs = torch.log_softmax(model(ids[:, :-1], ids[:, 1:])[0][0], dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(new))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    idx = torch.tensor([[0, 1, 0]])
    assert torch.equal(penalize_repetition(logits, idx, 2.0), torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    assert torch.equal(penalize_repetition(logits, idx, 1.0), logits)


def test_repetition_penalty_makes_repeats_rarer(trained_run):
    model, tokenizer, _ = load_model(str(trained_run / "out" / "trained.pth"))
    idx = torch.tensor([tokenizer.encode("The baby is")])
    plain = model.generate(idx, 60, greedy=True)[0].tolist()  # no stop token: sentence after sentence
    penalized = model.generate(idx, 60, greedy=True, repetition_penalty=1.5)[0].tolist()
    assert len(set(penalized)) > len(set(plain))
    prompt = "The baby is not eating some bread right now. The baby is"
    base = ["--ckpt=out/trained.pth", f"--start={prompt}", "--greedy", "--num_samples=1"]
    plain = run_script("sample.py", *base, cwd=trained_run).stdout
    penalized = run_script("sample.py", *base, "--repetition_penalty=3.0", cwd=trained_run).stdout
    assert plain.startswith(prompt) and penalized.startswith(prompt) and plain != penalized


def test_scores_prefer_the_right_tense(trained_run):
    model, tokenizer, _ = load_model(str(trained_run / "out" / "trained.pth"))
    total = lambda text: sum(lp for _, lp in score_text(model, tokenizer, text, "cpu"))
    assert total("The baby will sleep in the garden.") > total("The baby will slept in the garden.")
    assert total("She ate an apple yesterday.") > total("She eat an apple yesterday.")
    assert total("They have been playing in the garden for two hours.") > total(
        "They have been play in the garden for two hours."
    )
    out = run_script(
        "sample.py", "--ckpt=out/trained.pth", "--score=The baby will sleep.", cwd=trained_run
    ).stdout.splitlines()
    import ast

    assert [ast.literal_eval(line.rsplit(None, 1)[0].strip()) for line in out[:-1]] == [
        "The",
        " baby",
        " will",
        " sleep",
        ".",
        "<end>",
    ]
    assert all(float(line.rsplit(None, 1)[1]) < 0 for line in out[:-1])
    assert out[-1].startswith("total log-probability -") and "over 6 tokens, perplexity" in out[-1]


def test_training_draws_a_loss_curve(tiny_run):
    pytest.importorskip("matplotlib")
    width, height = png_size(tiny_run / "out" / "loss.png")
    assert (width, height) == (560, 480)


def test_training_works_without_matplotlib(tiny_run, tmp_path):
    import subprocess

    block = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
        "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            block,
            os.path.join(ROOT, "train.py"),
            os.path.join(ROOT, "config", "tiny.py"),
            f"--data_dir={tiny_run / 'data'}",
            "--out_dir=out",
            "--max_iters=30",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "saved out/last.pth and out/trained.pth at iteration 30" in result.stdout
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", "last.pth", "metrics.jsonl", "trained.pth"]


def test_attention_heatmaps(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    result = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        "--start=The baby is",
        "--num_samples=1",
        "--max_new_tokens=8",
        f"--attention={tmp_path / 'attn.png'}",
        cwd=tiny_run,
    )
    assert result.stderr.strip() == f"saved attention heatmaps of 2 layers x 2 heads to {tmp_path / 'attn.png'}"
    width, height = png_size(tmp_path / "attn.png")
    assert width == height and width >= 400  # a 2 x 2 grid of square maps


def test_attention_labels_escape_what_a_font_cannot_draw():
    from sample import token_label
    from tensegpt.tokenizer import GPT2

    gpt2 = GPT2()
    assert [token_label(gpt2, t) for t in gpt2.encode("a\nb\x08 c")] == ["a", "\\n", "b", "\\x08", " c"]
    assert token_label(gpt2, gpt2.eot) == "<end>"
