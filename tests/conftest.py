import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread per process: pytest-xdist already runs a test per core, and most tests start
# scripts of their own; two threads each on 2 cores spend the time fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import run_script, tense_lines  # noqa: E402 - after the path is set


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A folder with 2,000 tense.txt lines prepared into data/ and config/tiny.py trained into out/."""
    folder = tmp_path_factory.mktemp("tiny_run")
    (folder / "corpus.txt").write_text("\n".join(tense_lines(2000)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=corpus.txt", cwd=folder)
    run_script("train.py", os.path.join(ROOT, "config", "tiny.py"), "--out_dir=out", "--max_iters=60", cwd=folder)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A model that has learned some grammar: 10,000 tense.txt lines, 2 layers of 64, 400 steps (~15 s)."""
    folder = tmp_path_factory.mktemp("trained_run")
    (folder / "corpus.txt").write_text("\n".join(tense_lines(10000)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=corpus.txt", cwd=folder)
    run_script(
        "train.py",
        os.path.join(ROOT, "config", "tiny.py"),
        "--out_dir=out",
        "--max_iters=400",
        "--n_embd=64",
        "--batch_size=32",
        "--eval_interval=400",
        "--warmup_iters=20",
        cwd=folder,
        timeout=300,
    )
    return folder
