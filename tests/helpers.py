"""Helpers the test files share: running the project's scripts as a user would, and sample text."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, cwd, check=True, timeout=120, **popen_args):
    """Runs a project script through its real command line; returns the CompletedProcess."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, **popen_args,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def fails(script, *args, cwd):
    """Runs a script that must refuse: exit code 1, no traceback, one 'error: ...' line; returns that line."""
    result = run_script(script, *args, cwd=cwd, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def tense_lines(n):
    with open(os.path.join(ROOT, "tense.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f][:n]
