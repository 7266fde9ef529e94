"""
The README's and the docs' commands, run as written, so they cannot drift from the code:
every `python ...` line of their code blocks runs in a scratch folder (with a short tense.txt
and the placeholder files it names) and must exit 0. Training commands get a few
iterations appended (`--max_iters` and friends, last one wins), eval.py fewer samples;
everything else is exactly the text.
"""

import os
import re
import shlex
import shutil

import pytest
from helpers import ROOT, run_script, tense_lines

# What a command needs that the README leaves to the reader, or why it is run elsewhere.
ELSEWHERE = {
    "serve.py": "a server that runs until it is stopped: tests/test_serve.py starts it on a loopback port",
    "hf:path/to/gpt2": "needs a downloaded GPT-2 folder: tests/test_hf.py runs the same commands on a small one",
    "out-lora/trained.pth": "needs a LoRA fine-tune: tests/test_export.py exports its adapters as a PEFT folder",
    "tests": "the test suite itself",
    "finetune_gpt2.py": "downloads GPT-2 124M; tests/test_chat.py runs --init_from=gpt2 on a cached tiny one",
}
EVAL_SHORT = ["--num_samples=40", "--time_prompts=12", "--probe_per_tense=2", "--chat_samples=8"]
SHORT = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=2"]


# the README first, then the docs pages in the order a reader meets them (later commands use earlier runs)
PAGES = ["README.md"] + [
    f"docs/{name}.md"
    for name in (
        "preparing-data",
        "training",
        "sampling",
        "eval",
        "scaling",
        "tokenizers",
        "hugging-face",
        "modern-block",
        "performance",
        "chat",
        "serving",
    )
]


def readme_commands():
    text = ""
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text += f.read() + "\n"
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split("  #")[0].split(" | ")[0].strip()
            for part in line.split(" && "):
                if part.startswith("python ") and not part.startswith("python -m"):
                    commands.append(part)
    return commands


def test_the_readme_has_the_commands_this_test_knows():
    commands = readme_commands()
    assert commands[0].startswith("python prepare.py") and len(commands) >= 20
    assert any("--interactive" in c for c in commands) and any("--example=paragraph" in c for c in commands)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    (tmp_path / "tense.txt").write_text("\n".join(tense_lines(3000)) + "\n", encoding="utf-8")
    book = "\n\n".join(
        f"Chapter {i}. Once upon a time there was a baby\nwho slept in the garden, and" for i in range(200)
    )
    # (alice.txt: docs/tokenizers.md's book, here the same chapters)
    for name in ("my.txt", "my_book.txt", "alice.txt"):
        (tmp_path / name).write_text(book + "\n", encoding="utf-8")
    (tmp_path / "prompt.txt").write_text("The baby is\n", encoding="utf-8")
    shutil.copytree(os.path.join(ROOT, "config"), tmp_path / "config")
    ran, trained_to = [], {}  # out_dir -> the iteration its checkpoint reached
    for command in readme_commands():
        skip = [why for needle, why in ELSEWHERE.items() if needle in command]
        if skip:
            continue
        args = shlex.split(command)[1:]
        script = args[0]
        if script == "make_tense.py" and "--out=" not in command and "--task=chat" not in command:
            continue  # would rewrite the short tense.txt the others use; the other make_tense line runs
        if script == "train.py":
            out_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--out_dir=")), "out")
            if "--init_from=resume" in command:  # a few iterations past where the last run stopped
                trained_to[out_dir] += 4
                args = args + SHORT + [f"--max_iters={trained_to[out_dir]}"]
            else:
                trained_to[out_dir] = 4
                args = args + SHORT + ([] if "--overwrite" in command else ["--overwrite=True"])
        if script == "eval.py":  # the options as written, then fewer samples (last one wins)
            args = args + EVAL_SHORT
        stdin = "The baby is\n/greedy\nShe has\n/quit\n" if "--interactive" in command else ""
        result = run_script(script, *args[1:], cwd=tmp_path, check=False, timeout=300, input=stdin)
        assert result.returncode == 0, (
            f"README command failed: {command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
        ran.append(command)
    assert len(ran) >= 15
