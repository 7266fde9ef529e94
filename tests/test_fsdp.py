"""FSDP (train.py --fsdp=True) on CPU: 2 processes under torchrun or spawn, gloo between them."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ROOT, losses, run_script, torchrun

from model import GPT, GPTConfig
from train import DEFAULTS

TINY = os.path.join(ROOT, "config", "tiny.py")
CONFIG = GPTConfig(
    vocab_size=128,
    block_size=16,
    n_layer=2,
    n_head=4,
    n_embd=32,
    bias=True,
    pos_encoding="rotary",
    activation="swiglu",
    n_kv_head=2,
    qk_norm=True,
)
pytestmark = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 9),
    reason="FSDP2 on CPU needs torch 2.9",
)


def sharded_gradients(rank, world_size, init_file, x, y, out_file):
    from tensegpt.distributed import build_gpt, leave_process_group
    from train import DEFAULTS

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = raw_model = build_gpt(CONFIG, {**DEFAULTS, "fsdp": True}, "cpu", world_size, "float32")
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    model(x[shard], y[shard])[1].backward()
    weights = {name: p.full_tensor() for name, p in raw_model.named_parameters()}  # every rank takes part in the gather
    grads = {name: p.grad.full_tensor() for name, p in raw_model.named_parameters()}
    local = {name: p.to_local().numel() for name, p in raw_model.named_parameters()}
    if rank == 0:
        torch.save({"weights": weights, "grads": grads, "local": local}, out_file)
    leave_process_group(0)  # as train.py ends: a plain return can abort at interpreter shutdown


def test_fsdp_builds_the_same_weights_and_gradients_as_one_process(tmp_path):
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (8, 16), generator=generator)
    y = torch.randint(0, 128, (8, 16), generator=generator)
    mp.spawn(sharded_gradients, args=(2, str(tmp_path / "rendezvous"), x, y, str(tmp_path / "out.pt")), nprocs=2)
    sharded = torch.load(tmp_path / "out.pt", weights_only=True)

    torch.manual_seed(DEFAULTS["seed"])  # what every rank builds from (and one process, seeded at the start)
    reference = GPT(CONFIG)
    reference(x, y)[1].backward()  # the whole global batch in one process
    for name, p in reference.named_parameters():
        # every rank builds the whole model alike and keeps its shard: the very numbers of one process
        assert torch.equal(sharded["weights"][name], p.detach()), name
        # gradients averaged over the ranks, not summed (torch 2.7-2.8 summed them on CPU)
        assert torch.allclose(sharded["grads"][name], p.grad, atol=1e-6, rtol=1e-5), name
        # each rank holds about half of every tensor: rows split in two
        assert sharded["local"][name] == -(-p.shape[0] // 2) * p[0].numel(), name


def test_fsdp_trains_and_resumes_like_one_process_in_either_direction(tiny_run, tmp_path):
    common = [
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--grad_accum=2",
        "--log_interval=2",
        "--eval_interval=4",
        "--lr_decay_iters=8",
    ]
    # a: 4 steps under FSDP, then one process resumes; b: 4 steps in one process, then FSDP resumes
    torchrun(*common, "--max_iters=4", "--out_dir=a", "--fsdp=True", cwd=tmp_path)
    run_script("train.py", *common, "--max_iters=8", "--out_dir=a", "--init_from=resume", cwd=tmp_path)
    run_script("train.py", *common, "--max_iters=4", "--out_dir=b", cwd=tmp_path)
    shutil.copytree(tmp_path / "b", tmp_path / "one")
    run_script(
        "train.py", *common, "--max_iters=8", "--out_dir=one", "--init_from=resume", cwd=tmp_path
    )  # the reference
    result = torchrun(*common, "--max_iters=8", "--out_dir=b", "--init_from=resume", "--fsdp=True", cwd=tmp_path)
    assert "FSDP;" in result.stdout and result.stdout.count("saved b/last.pth and b/trained.pth at iteration 8") == 1
    one = losses(tmp_path / "one")
    assert len(one) == 8
    assert losses(tmp_path / "a") == pytest.approx(one, abs=1e-4)  # its first 4 steps trained under FSDP
    assert losses(tmp_path / "b") == pytest.approx(one, abs=1e-4)  # its last 4

    # the FSDP checkpoint is an ordinary one: whole weights, loadable with weights_only, sampled from
    checkpoint = torch.load(tmp_path / "b" / "trained.pth", weights_only=True)
    vocab_size = json.loads((tiny_run / "data" / "meta.json").read_text())["vocab_size"]
    assert checkpoint["model"]["wte.weight"].shape == (-(-vocab_size // 64) * 64, 32) and checkpoint["iter_num"] == 8
    assert all(isinstance(name, str) for name in checkpoint["optimizer"]["state"])
    sampled = run_script(
        "sample.py",
        "--ckpt=b/trained.pth",
        "--start=The baby",
        "--num_samples=1",
        "--max_new_tokens=5",
        cwd=tmp_path,
    )
    assert sampled.stdout.startswith("The baby")


def test_fsdp_checkpoint_exports_to_hugging_face(tmp_path):
    from helpers import tense_lines

    (tmp_path / "in.txt").write_text("\n".join(tense_lines(300)) + "\n")
    run_script("prepare.py", "--input=in.txt", "--full_vocab=True", cwd=tmp_path)
    torchrun(
        TINY,
        "--max_iters=2",
        "--eval_interval=2",
        "--eval_iters=1",
        "--grad_accum=2",
        "--bias=True",
        "--fsdp=True",
        "--n_embd=16",
        "--block_size=16",
        cwd=tmp_path,
    )
    out = run_script("export.py", "--ckpt=out-tiny/trained.pth", "--out=hf", cwd=tmp_path)
    assert out.stdout.startswith("wrote hf/config.json, model.safetensors")
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    weights = torch.load(tmp_path / "out-tiny" / "trained.pth", weights_only=True)["model"]
    assert torch.equal(exported["transformer.wte.weight"], weights["wte.weight"][:50257])
    assert torch.equal(exported["transformer.h.1.mlp.c_fc.weight"], weights["blocks.1.mlp.c_fc.weight"].t())


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--fsdp=True"],
            "error: --fsdp=True shards the model across the processes torchrun starts: run torchrun "
            "--nproc_per_node=N "
            "train.py ... (one process has nothing to share with)",
        ),
    ],
)
def test_fsdp_mistakes_are_one_line(tiny_run, tmp_path, args, message):
    from helpers import fails

    assert fails("train.py", TINY, f"--data_dir={tiny_run / 'data'}", *args, cwd=tmp_path) == message


def test_fsdp_refuses_muon_on_every_rank_without_hanging(tiny_run, tmp_path):
    result = torchrun(
        TINY,
        f"--data_dir={tiny_run / 'data'}",
        "--grad_accum=2",
        "--fsdp=True",
        "--optimizer=muon",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert (
        "error: --optimizer=muon orthogonalises whole matrices, which FSDP splits across processes: "
        "use --fsdp=False or --optimizer=adamw"
    ) in result.stderr
