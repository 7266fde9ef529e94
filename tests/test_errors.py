"""Bad input: one clear line naming the problem and the fix, exit code 1, nothing overwritten."""

import os
import shutil

import pytest
from helpers import ROOT, fails, run_script, tense_lines

TINY = os.path.join(ROOT, "config", "tiny.py")


# ------------------------------------------------------------------ prepare.py


def test_prepare_missing_input(tmp_path):
    assert (
        fails("prepare.py", "--input=nope.txt", cwd=tmp_path)
        == "error: input file nope.txt does not exist; pass --input=FILE with a UTF-8 text file"
    )


@pytest.mark.parametrize("example", ["line", "paragraph", "file"])
@pytest.mark.parametrize("content", [b"", b"  \n\t\n   \n"])
def test_prepare_empty_or_whitespace_input(tmp_path, content, example):
    (tmp_path / "in.txt").write_bytes(content)
    assert (
        fails("prepare.py", "--input=in.txt", f"--example={example}", cwd=tmp_path)
        == "error: in.txt has no text (it is empty or only whitespace); give it at least a few lines"
    )


def test_prepare_bytes_that_are_not_utf8(tmp_path):
    good = "\n".join(tense_lines(50)).encode()
    (tmp_path / "in.txt").write_bytes(good + b"\nbad \xff byte\n")
    message = fails("prepare.py", "--input=in.txt", cwd=tmp_path)
    assert message == (
        f"error: in.txt is not UTF-8: byte 0xff at offset {len(good) + 5} (line 51); "
        "convert it to UTF-8, or pass --errors=replace to replace bad bytes with U+FFFD"
    )
    assert not (tmp_path / "data").exists() or not (tmp_path / "data" / "meta.json").exists()
    run_script("prepare.py", "--input=in.txt", "--errors=replace", cwd=tmp_path)
    assert (tmp_path / "data" / "meta.json").exists()


def test_prepare_output_folder_not_writable(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(50)))
    (tmp_path / "afile").write_text("")
    message = fails("prepare.py", "--input=in.txt", "--out_dir=afile/data", cwd=tmp_path)
    assert message == "error: cannot write to folder afile/data (Not a directory); choose another with --out_dir=DIR"


def test_prepare_corpus_too_small(tmp_path):
    (tmp_path / "in.txt").write_text("Hi.\n")
    message = fails("prepare.py", "--input=in.txt", cwd=tmp_path)
    assert (
        message == "error: in.txt is too small: it has 1 line, and train and val need at least one each; add more lines"
    )


# ------------------------------------------------------------------ train.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors_data")
    (folder / "in.txt").write_text("\n".join(tense_lines(300)) + "\n")
    run_script("prepare.py", "--input=in.txt", cwd=folder)
    return folder


def test_train_without_prepared_data(tmp_path):
    assert (
        fails("train.py", TINY, cwd=tmp_path)
        == "error: no prepared data in data/ (meta.json is missing): run python prepare.py first, or pass "
        "--data_dir=DIR"
    )


def test_train_split_shorter_than_the_context(data_dir, tmp_path):
    val_tokens = os.path.getsize(data_dir / "data" / "val.bin") // 2
    message = fails("train.py", TINY, f"--data_dir={data_dir / 'data'}", "--block_size=1000", cwd=tmp_path)
    assert message == (
        f"error: the val split has {val_tokens} tokens, fewer than block_size + 1 = 1001: "
        f"use --block_size={val_tokens - 1} or less, or prepare with a larger --val_fraction"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--n_layers=2"],
            "error: unknown config key 'n_layers' (from --n_layers=2); did you mean n_layer? "
            "(the keys are train.py's DEFAULTS and model.py's GPTConfig)",
        ),
        (
            ["--learning_rate=fast"],
            "error: config key learning_rate wants a float, got 'fast' (from --learning_rate=fast)",
        ),
        (["config/nope.py"], "error: config file config/nope.py does not exist (the configs are in config/)"),
        (["--n_embd=30", "--n_head=4"], "error: n_embd (30) must be divisible by n_head (4)"),
        (["--n_layer=0"], "error: n_layer must be positive, got 0"),
        (["--batch_size=-1"], "error: config key batch_size must be positive, got -1"),
        (
            ["--init_from=resume"],
            "error: no checkpoint at out-tiny/trained.pth: nothing to resume; leave out --init_from=resume "
            "to start a new run, or pass the --out_dir of the run to continue",
        ),
    ],
)
def test_train_bad_settings(data_dir, tmp_path, args, message):
    assert fails("train.py", TINY, f"--data_dir={data_dir / 'data'}", *args, cwd=tmp_path) == message


def test_train_config_file_that_does_not_parse(data_dir, tmp_path):
    (tmp_path / "bad.py").write_text("n_layer = (\n")
    message = fails("train.py", "bad.py", f"--data_dir={data_dir / 'data'}", cwd=tmp_path)
    assert message.startswith("error: config file bad.py does not parse (line 1): SyntaxError")


def test_resume_with_another_model_config_names_the_keys(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "out", tmp_path / "out")
    message = fails(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--out_dir=out",
        "--init_from=resume",
        "--n_embd=64",
        "--max_iters=100",
        cwd=tmp_path,
    )
    assert message == (
        "error: out/last.pth was trained with --n_embd=32 and this run asks for --n_embd=64: the saved "
        "weights are that model's; resume with --n_embd=32, or start a new run from scratch (leave out "
        "--init_from=resume and pass another --out_dir, or --overwrite=True)"
    )


@pytest.mark.parametrize(
    "script,args",
    [
        ("sample.py", ["--ckpt=out/last.pth"]),
        ("export.py", ["--ckpt=out/last.pth", "--out=hf"]),
        ("train.py", [TINY, "--data_dir=DATA", "--out_dir=out", "--init_from=resume", "--max_iters=100"]),
    ],
)
def test_a_checkpoint_with_a_model_key_this_version_lacks_is_one_line_everywhere(tiny_run, tmp_path, script, args):
    import torch

    shutil.copytree(tiny_run / "out", tmp_path / "out")
    checkpoint = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    checkpoint["model_config"]["future_switch"] = True  # written by a later version
    torch.save(checkpoint, tmp_path / "out" / "last.pth")
    message = fails(script, *(a.replace("DATA", str(tiny_run / "data")) for a in args), cwd=tmp_path)
    assert message == (
        "error: out/last.pth is not a checkpoint this version of the project can load (TypeError: "
        "GPTConfig.__init__() got an unexpected keyword argument 'future_switch')"
    )


def test_scratch_run_does_not_overwrite_a_checkpoint_unless_asked(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "out", tmp_path / "out")
    before = (tmp_path / "out" / "trained.pth").read_bytes()
    message = fails("train.py", TINY, f"--data_dir={tiny_run / 'data'}", "--out_dir=out", cwd=tmp_path)
    assert message == (
        f"error: out/trained.pth already exists: to start over, run python train.py {TINY} "
        f"--data_dir={tiny_run / 'data'} --out_dir=out --overwrite=True; to continue it, --init_from=resume; "
        f"or pass another --out_dir"
    )
    assert (tmp_path / "out" / "trained.pth").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "out", tmp_path / "out")
    before = (tmp_path / "out" / "trained.pth").read_bytes()
    message = fails(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--out_dir=out",
        "--overwrite=True",
        "--learning_rate=1e30",
        "--warmup_iters=0",
        "--grad_clip=0.0",
        "--eval_interval=1000",
        cwd=tmp_path,
    )
    assert message.startswith("error: loss became nan at iteration ") or message.startswith(
        "error: loss became inf at iteration "
    )
    assert message.endswith(
        "stopped without saving, out/last.pth keeps the last good state; try a lower --learning_rate (now 1e+30)"
    )
    assert (tmp_path / "out" / "trained.pth").read_bytes() == before


# ------------------------------------------------------------------ sample.py


def test_sample_without_checkpoint(tmp_path):
    assert (
        fails("sample.py", cwd=tmp_path)
        == "error: no checkpoint at out/trained.pth: train one first with python train.py config/small.py "
        "(or pass --ckpt=PATH)"
    )


def test_sample_file_that_is_not_a_checkpoint(tiny_run, tmp_path):
    (tmp_path / "junk.pth").write_bytes(os.urandom(1000))
    assert fails("sample.py", "--ckpt=junk.pth", cwd=tmp_path) == (
        "error: junk.pth is not a checkpoint (not a torch.save "
        "archive, or truncated): pass the trained.pth that train.py wrote"
    )
    whole = (tiny_run / "out" / "trained.pth").read_bytes()
    for name, part in (("half.pth", whole[: len(whole) // 2]), ("tail.pth", whole[:-200])):
        (tmp_path / name).write_bytes(part)
        message = fails("sample.py", f"--ckpt={name}", cwd=tmp_path)
        assert message.startswith(f"error: {name} is not a") and "truncated" in message


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--start=FILE:missing.txt"],
            "error: prompt file missing.txt does not exist (from --start=FILE:missing.txt)",
        ),
        (
            ["--temperature=-1"],
            "error: --temperature must be between 0 and 2 (below 1e-5: the most likely token); got -1.0",
        ),
        (
            ["--top_k=2.5"],
            "error: --top_k must be a whole number >= 1 (0 or -1: every token); got 2.5",
        ),
        (["--top_p=1.5"], "error: --top_p must be in (0, 1] (1: every token); got 1.5"),
        (["--top_p=0"], "error: --top_p must be in (0, 1] (1: every token); got 0.0"),
    ],
)
def test_sample_bad_settings(tiny_run, args, message):
    assert fails("sample.py", "--ckpt=out/trained.pth", *args, cwd=tiny_run) == message


def test_sample_prompt_longer_than_the_context(tiny_run):
    long_prompt = " ".join(["The baby is sleeping."] * 20)
    result = run_script(
        "sample.py",
        "--ckpt=out/trained.pth",
        f"--start={long_prompt}",
        "--num_samples=1",
        "--max_new_tokens=5",
        cwd=tiny_run,
    )
    from tensegpt.checkpoint import load_model

    tokenizer = load_model(str(tiny_run / "out" / "trained.pth"))[1]
    n_tokens = len(tokenizer.encode(long_prompt))
    assert n_tokens > 32
    assert result.stderr.strip() == (
        f"note: the prompt has {n_tokens} tokens, more than the model's context of 32; keeping its last 32"
    )
    kept = tokenizer.decode(tokenizer.encode(long_prompt)[-32:])
    assert long_prompt.endswith(kept) and result.stdout.startswith(kept) and len(result.stdout) > len(kept) + 1


def test_train_with_damaged_meta_json(data_dir, tmp_path):
    import shutil as sh

    sh.copytree(data_dir / "data", tmp_path / "data")
    (tmp_path / "data" / "meta.json").write_text('{"tokenizer": "gpt2-comp')
    message = fails("train.py", TINY, cwd=tmp_path)
    assert message == (
        "error: data/meta.json is damaged (not JSON: Unterminated string starting at: line 1 column 15 "
        "(char 14)): run python prepare.py again"
    )


def test_a_device_that_is_not_there(data_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert (
        fails("train.py", TINY, f"--data_dir={data_dir / 'data'}", "--device=cuda", cwd=tmp_path)
        == "error: --device=cuda, but this torch sees no CUDA GPU; use --device=cpu (or auto)"
    )
    assert (
        fails("sample.py", "--device=tpu", cwd=tmp_path)
        == "error: --device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"
    )


def test_resume_from_a_checkpoint_that_train_did_not_write(tiny_run, tmp_path):
    import torch

    checkpoint = torch.load(tiny_run / "out" / "trained.pth", weights_only=True)
    del checkpoint["optimizer"], checkpoint["rng"]
    (tmp_path / "out").mkdir()
    torch.save(checkpoint, tmp_path / "out" / "trained.pth")
    message = fails(
        "train.py",
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--out_dir=out",
        "--init_from=resume",
        "--max_iters=100",
        cwd=tmp_path,
    )
    assert message == "error: out/trained.pth cannot be resumed: it lacks optimizer, rng (not written by train.py?)"
