"""
Nothing a user does loses progress or trains on wrong data silently: failed writes, torn
logs, two runs in one folder, damaged or mismatched data, and every option checked before
work starts. Each case goes through the real command line where a user would meet it.
"""

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, fails, run_script, tense_lines

from tensegpt import checkpoint as ckpt
from tensegpt import common

TINY = os.path.join(ROOT, "config", "tiny.py")


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run's data/ and out/ that a test may damage."""
    shutil.copytree(tiny_run / "data", tmp_path / "data")
    shutil.copytree(tiny_run / "out", tmp_path / "out")
    return tmp_path


def resume(folder, *args, check=True, **kwargs):
    return run_script(
        "train.py",
        TINY,
        "--out_dir=out",
        "--init_from=resume",
        "--max_iters=70",
        *args,
        cwd=folder,
        check=check,
        **kwargs,
    )


# ------------------------------------------------------------------ progress is never lost


def test_a_save_that_fails_half_way_leaves_the_old_checkpoint_byte_identical(tmp_path, monkeypatch):
    target = tmp_path / "trained.pth"
    target.write_bytes(b"the old checkpoint")
    real_fdopen = os.fdopen

    class DiskFills:
        """A file that takes 1,000 bytes, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(common.os, "fdopen", lambda fd, mode: DiskFills(real_fdopen(fd, mode)))
    checkpoint = {"model": {"w": torch.randn(100, 100)}, "model_config": {}, "tokenizer_meta": {}}
    with pytest.raises(common.UserError) as raised:
        ckpt.save(checkpoint, str(target))  # torch.save reports this as a C++ error: we name the cause
    assert str(raised.value) == f"cannot write {target} (No space left on device); the previous file is unchanged"
    assert target.read_bytes() == b"the old checkpoint" and os.listdir(tmp_path) == ["trained.pth"]


def limit_file_size(size):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_checkpoint_too_large_for_the_disk_is_one_line_and_the_old_ones_stay(run_copy):
    before = {name: (run_copy / "out" / name).read_bytes() for name in ("trained.pth", "last.pth")}
    assert len(before["last.pth"]) > 200_000
    result = run_script(
        "train.py",
        TINY,
        "--out_dir=out",
        "--init_from=resume",
        "--max_iters=70",
        cwd=run_copy,
        check=False,
        preexec_fn=limit_file_size(200_000),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: cannot write out/last.pth (File too large); the previous file is unchanged"
    assert {name: (run_copy / "out" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(run_copy / "out")) == [
        ".lock",
        "last.pth",
        "loss.png",
        "metrics.jsonl",
        "trained.pth",
    ]


def test_a_torn_or_foreign_metrics_line_never_stops_training_or_resume(run_copy):
    with open(run_copy / "out" / "metrics.jsonl", "a") as f:
        f.write('{"iter": 61, "train_loss": 1.0, "val_lo\n[1, 2]\nnot json at all\n{"iter": "x", "val_loss": 2}\n')
    (run_copy / "out" / "loss.png").unlink()
    out = resume(run_copy)
    assert "saved out/last.pth" in out.stdout and out.stderr == ""
    assert (run_copy / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn from the lines that parse
    from tensegpt.runlog import read_metrics

    records = read_metrics(run_copy / "out" / "metrics.jsonl")
    assert [r["iter"] for r in records if "val_loss" in r][-1] == 70


def test_a_plot_that_fails_is_a_warning_and_training_goes_on(run_copy):
    (run_copy / "out" / "loss.png").unlink()
    (run_copy / "out" / "loss.png").mkdir()  # a folder where the picture goes: savefig cannot replace it
    out = resume(run_copy)
    assert out.stderr.startswith("warning: could not draw out/loss.png (cannot write out/loss.png (Is a directory)")
    assert torch.load(run_copy / "out" / "last.pth", weights_only=True)["iter_num"] == 70


def test_a_second_run_into_the_same_out_dir_refuses_and_a_stale_lock_does_not_block(run_copy):
    with open(run_copy / "out" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        held.truncate(0)
        held.write("4242")
        held.flush()
        assert fails("train.py", TINY, "--out_dir=out", "--init_from=resume", "--max_iters=70", cwd=run_copy) == (
            "error: another train.py (process 4242) is training into out/ right now: wait for it to finish, "
            "or pass another --out_dir"
        )
    # the holder is gone (a killed process's lock goes with it); the file left behind does not block
    assert (run_copy / "out" / ".lock").exists()
    assert "saved out/last.pth" in resume(run_copy).stdout


def test_the_best_checkpoint_is_kept_when_later_evaluations_are_worse(run_copy):
    best_before = (run_copy / "out" / "trained.pth").read_bytes()
    last = torch.load(run_copy / "out" / "last.pth", weights_only=True)
    last["best_val_loss"] = 0.01  # as if an earlier evaluation had been far better than any to come
    torch.save(last, run_copy / "out" / "last.pth")
    out = resume(run_copy, "--max_iters=100", "--eval_interval=20")
    assert "saved out/last.pth at iteration 100 (latest)" in out.stdout and "out/trained.pth at" not in out.stdout
    assert (run_copy / "out" / "trained.pth").read_bytes() == best_before  # not replaced by a worse model
    assert torch.load(run_copy / "out" / "last.pth", weights_only=True)["iter_num"] == 100


# ------------------------------------------------------------------ data is what it claims to be


@pytest.mark.parametrize("bad_id", ["vocab", "padding"])
def test_token_ids_past_the_vocabulary_are_refused(run_copy, bad_id):
    meta = json.loads((run_copy / "data" / "meta.json").read_text())
    ids = np.fromfile(run_copy / "data" / "train.bin", dtype=np.uint16)
    # an id past the padded rows crashes in the embedding; one in the padding rows would train silently
    ids[100] = 65000 if bad_id == "vocab" else meta["vocab_size"]
    ids.tofile(run_copy / "data" / "train.bin")
    message = fails("train.py", TINY, "--out_dir=new", cwd=run_copy)
    assert message == (
        f"error: data/train.bin holds token id {ids[100]}, but data/meta.json says the vocabulary has "
        f"{meta['vocab_size']} ids: the files do not belong together; run python prepare.py again"
    )


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"vocab_size": "1041"}, "vocab_size is '1041', not a whole number"),
        ({"train_tokens": [1, 2]}, "train_tokens is [1, 2], not a whole number"),
        ({"gpt2_ids": "0 1 2"}, "gpt2_ids is '0 1 2', not a list"),
        ({"gpt2_ids": ["a"]}, "gpt2_ids is not a list of whole numbers"),
        ({"vocab_size": True}, "vocab_size is True, not a whole number"),
        ({"tokenizer": None}, "tokenizer is None, not text"),
        ({"vocab_size": 12}, "vocab_size 12 does not match its tokenizer's"),
    ],
)
def test_every_meta_json_field_is_type_checked(run_copy, change, problem):
    meta = json.loads((run_copy / "data" / "meta.json").read_text())
    meta.update(change)
    (run_copy / "data" / "meta.json").write_text(json.dumps(meta))
    assert (
        fails("train.py", TINY, "--out_dir=new", cwd=run_copy)
        == f"error: data/meta.json is damaged ({problem}): run python prepare.py again"
    )


def test_meta_json_that_is_a_list_or_lacks_fields(run_copy):
    (run_copy / "data" / "meta.json").write_text("[1, 2]")
    assert (
        fails("train.py", TINY, "--out_dir=new", cwd=run_copy)
        == "error: data/meta.json is damaged (it holds a list, not an object): run python prepare.py again"
    )
    (run_copy / "data" / "meta.json").write_text('{"tokenizer": "gpt2"}')
    assert fails("train.py", TINY, "--out_dir=new", cwd=run_copy) == (
        "error: data/meta.json is damaged (vocab_size is "
        "missing; train_tokens is missing; val_tokens is missing): run python prepare.py again"
    )


def test_resume_on_data_prepared_differently_is_refused(run_copy):
    (run_copy / "corpus.txt").write_text("\n".join(tense_lines(2000)) + "\n", encoding="utf-8")
    run_script(
        "prepare.py", "--input=corpus.txt", "--out_dir=data", "--seed=7", cwd=run_copy
    )  # the same text, split anew
    message = fails("train.py", TINY, "--out_dir=out", "--init_from=resume", "--max_iters=70", cwd=run_copy)
    assert message.startswith("error: out/last.pth was trained on data prepared differently from data/ (")
    assert "seed 1337 then, 7 now" in message
    assert message.endswith(
        "resuming would train on lines it was validated on, or on other text; "
        "prepare the data as before, or start a new --out_dir"
    )
    run_script("prepare.py", "--input=corpus.txt", "--out_dir=data", cwd=run_copy)  # prepared as before: it resumes
    assert "resuming out/last.pth at iteration 60" in resume(run_copy).stdout


# --------------------------------------------------------------- resume refuses what its state cannot serve


def test_every_train_key_has_one_resume_rule():
    from tensegpt import run_setup
    from train import DEFAULTS

    tables = [
        run_setup.RESUME_FREE,
        run_setup.RESUME_SCHEDULE,
        set(run_setup.RESUME_NOTED),
        set(run_setup.RESUME_MATCH),
    ]
    ruled = [key for table in tables for key in table]
    assert sorted(ruled) == sorted(DEFAULTS), "each key of train.py's DEFAULTS needs exactly one resume rule"


def changed(value):
    """Another value of the same type, picked at random."""
    rng = np.random.default_rng()
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + int(rng.integers(1, 5))
    if isinstance(value, float):
        return value + float(rng.uniform(0.01, 0.09))
    others = {"adamw": "muon", "muon": "adamw", "learned": "rotary", "gelu": "swiglu", "layernorm": "rmsnorm"}
    return others.get(value, value.split(",")[0])  # lora_targets: fewer matrices


def test_every_must_match_key_changed_on_resume_is_refused_naming_both_values(run_copy, monkeypatch):
    from tensegpt import run_setup
    from train import DEFAULTS

    monkeypatch.chdir(run_copy)
    saved = torch.load(run_copy / "out" / "last.pth", weights_only=True)
    config = {**DEFAULTS, **saved["train_config"], "max_iters": 100}
    meta = json.loads((run_copy / "data" / "meta.json").read_text())
    for key in run_setup.RESUME_MATCH:
        new = {**config, key: changed(config[key])}
        with pytest.raises(common.UserError) as refused:
            run_setup.load_resumable("out/last.pth", saved["tokenizer_meta"], meta, new, DEFAULTS)
        trained, asks = str(refused.value).split(" and this run asks for ")
        assert trained.endswith(f" was trained with --{key}={config[key]!r}"), trained
        assert asks.startswith(f"--{key}={new[key]!r}: {run_setup.RESUME_MATCH[key]}; resume with --{key}="), asks
        assert asks.endswith("or start a new run from scratch (leave out --init_from=resume and pass another "
                             "--out_dir, or --overwrite=True)")  # fmt: skip
    for key in run_setup.RESUME_NOTED:  # these go on, with a line that says what changed
        new = {**config, key: changed(config[key])}
        _, notes = run_setup.load_resumable("out/last.pth", saved["tokenizer_meta"], meta, new, DEFAULTS)
        assert notes == [f"note: --{key} was {config[key]!r} and is now {new[key]!r}: {run_setup.RESUME_NOTED[key]}"]


@pytest.mark.parametrize("before,after", [("muon", "adamw"), ("adamw", "muon")])
def test_resume_with_another_optimizer_is_one_line_before_any_work(tiny_run, tmp_path, before, after):
    shutil.copytree(tiny_run / "data", tmp_path / "data")
    run_script(
        "train.py",
        TINY,
        "--out_dir=out",
        f"--optimizer={before}",
        "--max_iters=2",
        "--eval_interval=2",
        cwd=tmp_path,
    )
    saved = (tmp_path / "out" / "last.pth").read_bytes()
    message = fails(
        "train.py",
        TINY,
        "--out_dir=out",
        f"--optimizer={after}",
        "--init_from=resume",
        "--max_iters=4",
        cwd=tmp_path,
    )
    assert message == (
        f"error: out/last.pth was trained with --optimizer={before!r} and this run asks for "
        f"--optimizer={after!r}: the saved optimizer state belongs to that optimizer; resume with "
        f"--optimizer={before!r}, or start a new run from scratch (leave out --init_from=resume and "
        f"pass another --out_dir, or --overwrite=True)"
    )
    assert (tmp_path / "out" / "last.pth").read_bytes() == saved


# ------------------------------------------------------------------ every data file agrees with meta.json


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_torn_or_foreign_data_file_is_one_line_for_every_script(run_copy, split):
    rng = np.random.default_rng()
    path = run_copy / "data" / f"{split}.bin"
    good = path.read_bytes()
    meta = json.loads((run_copy / "data" / "meta.json").read_text())
    changes = [int(rng.integers(1, 9)), -int(rng.integers(1, 9))]  # bytes appended (odd or even), or cut
    rng.shuffle(changes)
    for change, script in zip(changes, ("train.py", "eval.py")):  # each script meets one of them
        path.write_bytes(good + rng.bytes(change) if change > 0 else good[:change])
        size = len(good) + change
        expected = (
            f"error: data/{split}.bin has {size:,} bytes, but data/meta.json says "
            f"{meta[f'{split}_tokens']:,} "
            f"uint16 tokens ({len(good):,} bytes): the file is torn or from another folder; "
            f"run python prepare.py again"
        )
        args = [TINY, "--out_dir=new"] if script == "train.py" else ["--ckpt=out/trained.pth", "--data_dir=data"]
        assert fails(script, *args, cwd=run_copy) == expected
    path.unlink()
    assert fails("train.py", TINY, "--out_dir=new", cwd=run_copy) == (
        f"error: data/{split}.bin is missing (data/meta.json says it holds {meta[f'{split}_tokens']:,} "
        "tokens): "
        f"run python prepare.py again"
    )


def test_char_vocabulary_too_big_for_uint16_is_refused_before_writing(tmp_path):
    text = "".join(chr(c) for c in range(0x20000, 0x20000 + 70000))
    (tmp_path / "in.txt").write_text(text[:35000] + "\n" + text[35000:] + "\n", encoding="utf-8")
    assert fails("prepare.py", "--input=in.txt", "--tokenizer=char", cwd=tmp_path) == (
        "error: in.txt needs 70,001 char token ids with end-of-text, more than the 65,536 that uint16 ids can hold: "
        "use --tokenizer=gpt2"
    )
    assert not (tmp_path / "data" / "meta.json").exists()


def test_a_byte_order_mark_is_not_text(tmp_path):
    lines = tense_lines(40)
    (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    run_script("prepare.py", "--input=in.txt", "--split=last", "--val_fraction=0.1", cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    from tensegpt.tokenizer import from_meta

    first = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).tolist()
    tokenizer = from_meta(meta)
    assert tokenizer.decode(first[: first.index(tokenizer.eot)]) == lines[0]


# ------------------------------------------------------------------ every option is checked first


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("prepare.py", ["--seed=-1"], "--seed must be a whole number from 0 to 2**32 - 1, got -1"),
        ("prepare.py", ["--seed=10**20"], "config key seed wants an int, got '10**20' (from --seed=10**20)"),
        (
            "prepare.py",
            ["--seed=100000000000000000000"],
            "--seed must be a whole number from 0 to 2**32 - 1, got 100000000000000000000",
        ),
        ("prepare.py", ["--out_dir="], "--out_dir is empty: pass --out_dir=DIR"),
        ("prepare.py", ["--out_dir=afile"], "--out_dir=afile is a file, not a folder: pass --out_dir=DIR"),
        ("prepare.py", ["--input="], "--input is empty: pass --input=FILE with a UTF-8 text file"),
        ("prepare.py", ["--input=."], "--input=. is a folder: pass --input=FILE with a UTF-8 text file"),
        ("prepare.py", ["--example=sentence"], "--example must be line, paragraph or file, got 'sentence'"),
        (
            "prepare.py",
            ["--min_frequency=-1", "--tokenizer=word"],
            "--min_frequency must be 1 or more (0: the tokenizer's default), got -1",
        ),
        (
            "prepare.py",
            ["--vocab_size=300"],
            "--vocab_size applies to --tokenizer=word and bpe; a gpt2 vocabulary is what the text uses "
            "(--min_frequency makes the compact one smaller)",
        ),
        (
            "prepare.py",
            ["--min_frequency=3", "--full_vocab=True"],
            "--min_frequency applies to the compact gpt2 vocabulary and to "
            "--tokenizer=word: --full_vocab keeps all of GPT-2's tokens",
        ),
        (
            "prepare.py",
            ["--min_frequency=3", "--tokenizer=char"],
            "--min_frequency applies to the compact gpt2 vocabulary and to "
            "--tokenizer=word: char keeps every character of the text",
        ),
        ("train.py", [TINY, "--seed=-5"], "--seed must be a whole number from 0 to 2**32 - 1, got -5"),
        (
            "train.py",
            [TINY, "--seed=99999999999999999999"],
            "--seed must be a whole number from 0 to 2**32 - 1, got 99999999999999999999",
        ),
        ("train.py", [TINY, "--out_dir="], "--out_dir is empty: pass --out_dir=DIR"),
        (
            "train.py",
            [TINY, "--out_dir=afile"],
            "--out_dir=afile is a file, not a folder: pass --out_dir=DIR",
        ),
        (
            "train.py",
            [TINY, "--data_dir="],
            "--data_dir is empty: pass the folder prepare.py wrote, --data_dir=DIR",
        ),
        ("sample.py", ["--seed=-1"], "--seed must be a whole number from 0 to 2**63 - 1; got -1"),
        (
            "sample.py",
            ["--score="],
            '--score is empty: give the text to score, like --score="The baby is sleeping."',
        ),
        (
            "sample.py",
            ["--score=  "],
            '--score is empty: give the text to score, like --score="The baby is sleeping."',
        ),
        (
            "sample.py",
            ["--attention=nofolder/a.png"],
            "--attention=nofolder/a.png: the folder nofolder does not exist",
        ),
        ("sample.py", ["--attention=a.xyz"], "--attention=a.xyz: cannot write a .xyz file; use one of "),
        ("sample.py", ["--attention=."], "--attention=. is a folder: pass a file name"),
        (
            "sample.py",
            ["--attention=a.png", "--beam=3"],
            "--attention draws the attention of the first sample; it does not combine with --beam",
        ),
        (
            "sample.py",
            ["--score=Hi", "--beam=2"],
            "--score and --beam are different modes: use one at a time",
        ),
        ("train.py", ["--attention=fast"], "attention must be one of sdpa, explicit; got 'fast'"),
        ("bench.py", ["--timed_steps=0"], "--timed_steps must be at least 1, got 0"),
        (
            "bench.py",
            ["--input=in.txt", "--heldout=nope.txt"],
            "--heldout=nope.txt is not a file: pass a UTF-8 text, or leave it empty",
        ),
        (
            "bench.py",
            ["--input=nope.txt"],
            "--input=nope.txt is not a file: pass a UTF-8 text, like tense.txt",
        ),
        ("export.py", ["--ckpt=afile"], "afile is not a checkpoint (not a torch.save archive, or truncated)"),
        ("export.py", ["--ckpt=nope.pth"], "no checkpoint at nope.pth"),
        (
            "sample.py",
            ["--temperatures=[]"],
            "--temperatures must be numbers separated by commas, like 0.2,0.8,1.2 (got [])",
        ),
        ("eval.py", ["--chat_samples=-3"], "--chat_samples must be at least 1, got -3"),
        (
            "make_tense.py",
            ["--n=1000000000"],
            "--n must be between 1 and 258,552 (the distinct sentences the grammar draws quickly), got 1000000000",
        ),
        ("make_tense.py", ["--siblings=1.5"], "--siblings must be between 0 and 1, got 1.5"),
        (
            "make_tense.py",
            # one conversation cannot fill both files, whatever the draws
            ["--task=chat", "--n=1"],
            "--n=1 leaves no conversation in train or in val (a tenth is held out): use --n=100 or more",
        ),
    ],
)
def test_bad_options_are_one_line_before_any_work(tmp_path, script, args, message):
    (tmp_path / "afile").write_text("")
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(50)) + "\n")
    if script == "prepare.py" and not any(a.startswith("--input") for a in args):
        args = ["--input=in.txt", *args]
    assert fails(script, *args, cwd=tmp_path).startswith("error: " + message)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_attention_into_a_read_only_folder(tiny_run, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "ro").mkdir(mode=0o500)
    assert (
        fails("sample.py", f"--ckpt={tiny_run / 'out' / 'trained.pth'}", "--attention=ro/a.png", cwd=tmp_path)
        == "error: --attention=ro/a.png: the folder ro is not writable"
    )


def test_a_text_option_takes_the_text_as_written(tiny_run, tmp_path):
    out = run_script(
        "sample.py",
        f"--ckpt={tiny_run / 'out' / 'trained.pth'}",
        "--start=1984",
        "--num_samples=1",
        "--max_new_tokens=3",
        cwd=tmp_path,
    )
    assert out.stdout.startswith("1984")
    scored = run_script("sample.py", f"--ckpt={tiny_run / 'out' / 'trained.pth'}", "--score=1984", cwd=tmp_path)
    pieces = [eval(line.split()[0]) for line in scored.stdout.splitlines()[:-1]]  # repr() of our own output
    assert "".join(pieces[:-1]) == "1984" and pieces[-1] == "<end>"


def test_a_tiny_temperature_samples_the_most_likely_text(tiny_run, tmp_path):
    ckpt = f"--ckpt={tiny_run / 'out' / 'trained.pth'}"
    greedy = run_script("sample.py", ckpt, "--start=The baby", "--greedy", "--max_new_tokens=8", cwd=tmp_path)
    cold = run_script(
        "sample.py",
        ckpt,
        "--start=The baby",
        "--temperature=1e-30",
        "--num_samples=1",
        "--max_new_tokens=8",
        cwd=tmp_path,
    )
    assert cold.stdout == greedy.stdout and "nan" not in cold.stderr
    assert greedy.stderr.strip() == "note: --greedy gives the same text every time, so it is printed once (not 3 times)"


def test_a_checkpoint_with_nan_weights_is_refused(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "out" / "trained.pth", weights_only=True)
    checkpoint["model"]["blocks.0.attn.c_attn.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    assert fails("sample.py", "--ckpt=nan.pth", cwd=tmp_path) == (
        "error: nan.pth holds NaN or infinite weights (blocks.0.attn.c_attn.weight): it cannot generate; "
        "use a checkpoint from before training diverged"
    )


def hf_folder(tmp_path, config, weights):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


GOOD_HF_CONFIG = json.dumps(
    {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
).encode()


@pytest.mark.parametrize(
    "config,weights,message",
    [
        (b'{"model_type": "gpt2", "n_', None, "hf/config.json is not JSON (Unterminated string"),
        (b"[1]", None, "hf/config.json holds a list, not a JSON object of settings"),
        (
            b'{"model_type": "gpt2", "n_layer": "2"}',
            None,
            "hf/config.json: vocab_size is None, not a positive whole number",
        ),
        (
            GOOD_HF_CONFIG,
            b"\x00" * 3,
            "hf/model.safetensors is not a readable safetensors file (damaged or truncated: error)",
        ),
        (
            GOOD_HF_CONFIG,
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
            "hf/model.safetensors is not a readable safetensors file (damaged or truncated: JSONDecodeError)",
        ),
    ],
)
def test_hf_folders_that_are_damaged(tmp_path, config, weights, message):
    hf_folder(tmp_path, config, weights)
    assert fails("sample.py", "--init_from=hf:hf", cwd=tmp_path).startswith("error: " + message)


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_export_into_a_folder_with_another_model_refuses_then_replaces_its_files(tmp_path):
    safetensors = pytest.importorskip("safetensors")  # noqa: F841
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(300)) + "\n")
    run_script("prepare.py", "--input=in.txt", "--full_vocab=True", cwd=tmp_path)
    run_script("train.py", TINY, "--out_dir=out", "--max_iters=2", "--bias=True", cwd=tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"the old model's weights")
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert fails("export.py", "--ckpt=out/trained.pth", "--out=hf", cwd=tmp_path) == (
        "error: hf/ already holds files (notes.txt, pytorch_model.bin): "
        "pass --overwrite=True to replace its model files, or another --out=DIR"
    )
    run_script("export.py", "--ckpt=out/trained.pth", "--out=hf", "--overwrite=True", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "hf")) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "notes.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    # exporting again over our own files needs no --overwrite
    run_script("export.py", "--ckpt=out/trained.pth", "--out=hf2", cwd=tmp_path)
    run_script("export.py", "--ckpt=out/trained.pth", "--out=hf2", cwd=tmp_path)


def test_json_nested_deeper_than_the_parser_goes_is_one_line(tmp_path):
    """A RecursionError from json is the same one-line error as any other parse failure, in every reader."""
    deep = "[" * 100_000
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}'
    (tmp_path / "chat.jsonl").write_text(good + "\n" + deep + "\n")
    assert fails("prepare.py", "--input=chat.jsonl", cwd=tmp_path) == (
        "error: chat.jsonl line 2 is not JSON (nested too deeply): each line is one conversation, "
        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    )
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "meta.json").write_text(deep)
    assert fails("train.py", "--data_dir=data", cwd=tmp_path).startswith("error: data/meta.json is damaged (")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(deep)
    assert fails("sample.py", "--init_from=hf:hf", cwd=tmp_path).startswith("error: hf/config.json is not JSON (")


def test_a_machine_that_cannot_compile_trains_uncompiled_and_says_so():
    from model import GPT, GPTConfig
    from tensegpt.compiling import compile_now
    from tensegpt.distributed import compile_regions

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    config = {"batch_size": 2, "block_size": 8}
    idx = torch.randint(50, (2, 8))
    eager = model(idx, idx)[1]

    def no_compiler(graph, inputs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

    compile_regions(model, backend=no_compiler)
    said, state = [], torch.random.get_rng_state()
    assert compile_now(model, config, 50, "cpu", contextlib.nullcontext(), said.append) is False
    [note] = said
    assert note.startswith("note: torch.compile failed here (") and note.endswith("; training uncompiled")
    assert "No working C++ compiler" in note
    # the run's own random draws and gradients are as if nothing had happened, and the model runs as it did
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(idx, idx)[1], eager)
    assert all(block._compiled_call_impl is None for block in model.blocks)
    # where it compiles, the compiled blocks are what trains
    said.clear()
    compile_regions(model, backend="eager")
    assert compile_now(model, config, 50, "cpu", contextlib.nullcontext(), said.append) is True
    assert said[0].startswith("compiled in ") and model.blocks[0]._compiled_call_impl is not None


def test_train_py_without_a_cxx_compiler_says_so_and_trains_uncompiled(run_copy):
    # Inductor finds no working C++ compiler: what a machine without one meets with --compile=True
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(run_copy / "inductor")}
    args = [TINY, "--compile=True", "--max_iters=4", "--eval_interval=2", "--out_dir=fresh"]
    out = run_script("train.py", *args, cwd=run_copy, env=env).stdout
    assert "note: torch.compile failed here (InvalidCxxCompiler: No working C++ compiler found" in out
    assert out.count("training uncompiled") == 1 and "Traceback" not in out
    assert os.path.isfile(run_copy / "fresh" / "trained.pth")
