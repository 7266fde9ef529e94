"""
The docs cannot drift from the scripts: each script's option table (a docs page's table
headed "| `SCRIPT` option | default | meaning |") lists exactly the keys of its DEFAULTS,
each with its default. (Each option's meaning prints with --help: tests/test_config.py.)
"""

import glob
import os
import re

import pytest
from helpers import ROOT

from tensegpt.common import script_defaults

SCRIPTS = ["prepare.py", "train.py", "sample.py", "eval.py", "bench.py", "export.py", "make_tense.py"]


def option_tables():
    """{script: [(keys, defaults as written)]} from every docs page."""
    tables = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        script = None
        for line in open(path, encoding="utf-8").read().splitlines():
            header = re.match(r"\| `(\w+\.py)` option \| default \| meaning \|$", line)
            if header:
                script = header.group(1)
                tables.setdefault(script, [])
            elif script and line.startswith("| ---"):
                continue
            elif script and line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                keys = [k.strip("`").removeprefix("--").split("=")[0] for k in cells[0].split(", ")]
                values = cells[1].split(", ") if len(keys) > 1 else [cells[1]]
                tables[script].append((keys, values))
            else:
                script = None
    return tables


def written_default_matches(written, default):
    text = written.strip("`")
    if text in ("empty", "''") and default == "":
        return True
    if text == str(default) or text == repr(default):
        return True
    try:
        return not isinstance(default, (bool, str)) and default is not None and float(text) == float(default)
    except ValueError:
        return False


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_scripts_option_table_lists_its_defaults(script):
    defaults = script_defaults(os.path.join(ROOT, script))
    rows = option_tables().get(script)
    assert rows, f"no docs page has the option table of {script}"
    listed = [key for keys, _ in rows for key in keys]
    assert sorted(listed) == sorted(defaults), f"{script}: table {sorted(set(listed) ^ set(defaults))} differ"
    for keys, values in rows:
        assert len(keys) == len(values), f"{script}: {keys} has {len(values)} defaults"
        for key, value in zip(keys, values):
            assert written_default_matches(value, defaults[key]), (
                f"{script} --{key}: docs say {value}, DEFAULTS {defaults[key]!r}"
            )


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    pages = {f"docs/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert linked == pages, f"not linked: {sorted(pages - linked)}; missing: {sorted(linked - pages)}"
    assert len(readme.splitlines()) <= 300, "the README is a front door: details go to docs/"
