import os

import pytest
from helpers import ROOT, run_script

from tensegpt.common import UserError, parse_config
from train import DEFAULTS, get_lr

BASE = {"batch_size": 32, "learning_rate": 1e-3, "device": "auto", "compile": False, "d_ff": None}


def test_files_then_overrides_apply_in_order(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 8\nlearning_rate = 3e-4\n_private = 1\n")
    config = parse_config(BASE, [str(cfg), "--batch_size=16", "--device=cpu", "--compile=True", "--d_ff=256"])
    assert config == {"batch_size": 16, "learning_rate": 3e-4, "device": "cpu", "compile": True, "d_ff": 256}


def test_int_is_accepted_for_a_float_and_bare_bool_flag_is_true():
    config = parse_config(BASE, ["--learning_rate=1", "--compile"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["compile"] is True


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batchsize=8"], "unknown config key 'batchsize' (from --batchsize=8); did you mean batch_size?"),
        (["--batch_size=0.5"], "config key batch_size wants an int, got 0.5 (from --batch_size=0.5)"),
        (["--batch_size=big"], "config key batch_size wants an int, got 'big' (from --batch_size=big)"),
        (["--compile=1"], "config key compile wants a bool, got 1 (from --compile=1)"),
        (["--batch_size"], "--batch_size needs a value: write --batch_size=VALUE"),
        (["config/nope.py"], "config file config/nope.py does not exist (the configs are in config/)"),
    ],
)
def test_bad_settings_name_the_key(argv, message):
    with pytest.raises(UserError) as e:
        parse_config(BASE, argv)
    # an unknown key's message ends by naming where the keys live (the running script's DEFAULTS)
    assert str(e.value).split(" (the keys are ")[0] == message


def test_config_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = = 3\n")
    with pytest.raises(UserError, match=r"config file .*bad.py does not parse \(line 1\): SyntaxError"):
        parse_config(BASE, [str(bad)])
    unknown = tmp_path / "unknown.py"
    unknown.write_text("learning_rat = 0.1\n")
    with pytest.raises(
        UserError,
        match=r"unknown config key 'learning_rat' \(from .*unknown.py\); did you mean learning_rate\?",
    ):
        parse_config(BASE, [str(unknown)])


def test_shipped_configs_parse():
    for name in ("tiny", "small", "medium", "large", "gpt2"):
        parse_config(DEFAULTS, [f"config/{name}.py"])


def test_learning_rate_schedule():
    config = {
        **DEFAULTS,
        "learning_rate": 1e-3,
        "min_lr": 1e-4,
        "warmup_iters": 100,
        "max_iters": 1000,
        "lr_decay_iters": 0,
    }
    assert get_lr(0, config) == pytest.approx(1e-3 / 101)  # warmup starts small, never at 0
    assert get_lr(99, config) == pytest.approx(1e-3 * 100 / 101)
    assert get_lr(100, config) == pytest.approx(1e-3)  # warmup end: the peak
    assert get_lr(550, config) == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert get_lr(1000, config) == pytest.approx(1e-4)  # the end: min_lr
    assert get_lr(5000, config) == pytest.approx(1e-4)
    lrs = [get_lr(i, config) for i in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


SCRIPTS = ["prepare.py", "train.py", "sample.py", "eval.py", "bench.py", "export.py", "make_tense.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_one_meaning_shown_by_help(script):
    import importlib

    from tensegpt.common import option_meanings

    defaults = importlib.import_module(script[:-3]).DEFAULTS
    meanings = option_meanings(os.path.join(ROOT, script))
    assert sorted(meanings) == sorted(defaults), "every key of DEFAULTS has a comment: its meaning"
    shown = run_script(script, "--help", cwd=ROOT).stdout
    for key, meaning in meanings.items():
        assert f"--{key}={defaults[key]!r}" in shown and meaning in shown
