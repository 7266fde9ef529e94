"""Parity with Hugging Face's GPT-2: import its weights, export ours, same logits and same greedy text."""

import json
import os

import pytest
import torch
from helpers import ROOT, run_script, tense_lines

from tensegpt.common import UserError
from tensegpt.hf import load_hf, read_safetensors

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")


def small_hf_model(**overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **overrides,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random layer norms and biases too, so a mix-up would show
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5 if "bias" in name else 0.1).add_(
                    1.0
                    if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight")
                    else 0.0
                )
    return model


def hf_greedy(model, idx, n):
    out = model.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, idx.size(1) :].tolist()


def test_import_matches_transformers_logits_and_greedy_text(tmp_path):
    hf_model = small_hf_model()
    hf_model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    model = load_hf(str(tmp_path / "hf")).eval()
    config = model.config
    assert (
        config.vocab_size,
        config.block_size,
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.d_ff,
    ) == (50257, 64, 2, 3, 48, 192)
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        ours, _ = model(idx, idx)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    prompt = idx[:1, :5]
    assert model.generate(prompt, 25, greedy=True)[0, 5:].tolist() == hf_greedy(hf_model, prompt, 25)


def test_import_from_pytorch_model_bin(tmp_path):
    hf_model = small_hf_model()
    os.makedirs(tmp_path / "hf")
    hf_model.config.to_json_file(tmp_path / "hf" / "config.json")
    torch.save(hf_model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model = load_hf(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(idx, idx)[0], hf_model(idx).logits, atol=1e-5, rtol=0)


def test_our_safetensors_reader_matches_the_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.float32),
        "c": torch.randn(2, 2).half(),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    read = read_safetensors(str(tmp_path / "t.safetensors"))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k].float()) for k in tensors)


def test_missing_or_wrong_folders_are_clear_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"no Hugging Face model in .*nowhere: put its config.json and model.safetensors"
    ):
        load_hf(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "bert")
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="describes a 'bert' model; GPT-2 \\('gpt2'\\), Llama"):
        load_hf(str(tmp_path / "bert"))
    small_hf_model(scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path / "odd")
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx is True, but model.py implements only false"):
        load_hf(str(tmp_path / "odd"))
    result = run_script("sample.py", f"--init_from=hf:{tmp_path / 'nowhere'}", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: no Hugging Face model in {tmp_path / 'nowhere'}"
    )


@pytest.fixture(scope="module")
def gpt2_shaped_run(tmp_path_factory):
    """A tiny model trained here on GPT-2 ids with GPT-2's architecture (biases, learned positions, GELU)."""
    folder = tmp_path_factory.mktemp("gpt2_run")
    (folder / "in.txt").write_text("\n".join(tense_lines(500)) + "\n")
    run_script("prepare.py", "--input=in.txt", "--full_vocab=True", cwd=folder)
    run_script(
        "train.py",
        os.path.join(ROOT, "config", "tiny.py"),
        "--out_dir=out",
        "--max_iters=10",
        "--bias=True",
        cwd=folder,
    )
    return folder


def test_export_loads_in_transformers_with_the_same_logits_and_text(gpt2_shaped_run, tmp_path):
    out = run_script(
        "export.py",
        f"--ckpt={gpt2_shaped_run / 'out' / 'trained.pth'}",
        f"--out={tmp_path / 'hf'}",
        cwd=tmp_path,
    )
    assert out.stdout.startswith(f"wrote {tmp_path / 'hf'}/config.json, model.safetensors (GPT-2, ")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    from tensegpt.checkpoint import load_model

    model, tokenizer, _ = load_model(str(gpt2_shaped_run / "out" / "trained.pth"))
    idx = torch.tensor(
        [
            tokenizer.encode("The baby is sleeping in the garden now.")[:6],
            tokenizer.encode("Did they eat dinner yesterday?")[:6],
        ]
    )
    with torch.no_grad():
        ours = model(idx, idx)[0][..., :50257]  # our padding rows are not exported
        assert torch.allclose(hf_model(idx).logits, ours, atol=1e-5, rtol=0)
    prompt = idx[:1, :3]
    assert model.generate(prompt, 20, greedy=True)[0, 3:].tolist() == hf_greedy(hf_model, prompt, 20)
    # the exported tokenizer files are GPT-2's
    hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_a_relu_model_exports_as_gpt2_with_relu(gpt2_shaped_run, tmp_path):
    checkpoint = torch.load(gpt2_shaped_run / "out" / "trained.pth", weights_only=True)
    checkpoint["model_config"]["activation"] = "relu"  # the same weights, computed with ReLU
    torch.save(checkpoint, tmp_path / "relu.pth")
    run_script("export.py", "--ckpt=relu.pth", "--out=hf", cwd=tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.activation_function == "relu"
    from tensegpt.checkpoint import load_model

    model = load_model(str(tmp_path / "relu.pth"))[0]
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(hf_model(idx).logits, model(idx, idx)[0][..., :50257], atol=1e-5, rtol=0)


def test_export_without_biases_exports_zero_biases(tmp_path, gpt2_shaped_run):
    run_script(
        "train.py",
        os.path.join(ROOT, "config", "tiny.py"),
        f"--data_dir={gpt2_shaped_run / 'data'}",
        "--out_dir=nobias",
        "--max_iters=5",
        cwd=tmp_path,
    )
    run_script("export.py", "--ckpt=nobias/trained.pth", "--out=hf", cwd=tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    from tensegpt.checkpoint import load_model

    model = load_model(str(tmp_path / "nobias" / "trained.pth"))[0]
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(hf_model(idx).logits, model(idx, idx)[0][..., :50257], atol=1e-5, rtol=0)


def test_fine_tune_and_sample_from_hf_weights(tmp_path, gpt2_shaped_run):
    small_hf_model().save_pretrained(tmp_path / "hf")
    out = run_script(
        "train.py",
        f"--data_dir={gpt2_shaped_run / 'data'}",
        f"--init_from=hf:{tmp_path / 'hf'}",
        "--out_dir=ft",
        "--block_size=32",
        "--batch_size=4",
        "--max_iters=6",
        "--eval_interval=3",
        "--eval_iters=2",
        "--log_interval=3",
        cwd=tmp_path,
    )
    assert f"initialising from the weights in {tmp_path / 'hf'} (n_layer 2, n_head 3, n_embd 48" in out.stdout
    checkpoint = torch.load(tmp_path / "ft" / "trained.pth", weights_only=True)
    assert checkpoint["model_config"]["n_embd"] == 48 and checkpoint["model_config"]["block_size"] == 32
    assert checkpoint["iter_num"] == 6
    sampled = run_script(
        "sample.py",
        f"--init_from=hf:{tmp_path / 'hf'}",
        "--start=Hello",
        "--num_samples=1",
        "--max_new_tokens=5",
        cwd=tmp_path,
    )
    assert sampled.stdout.startswith("Hello") and len(sampled.stdout) > len("Hello\n")
    refused = run_script(
        "train.py",
        f"--data_dir={tiny_run_data(tmp_path)}",
        f"--init_from=hf:{tmp_path / 'hf'}",
        "--out_dir=ft2",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 1 and "prepare it with --full_vocab=True" in refused.stderr


def tiny_run_data(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(tense_lines(200)) + "\n")
    run_script("prepare.py", "--input=c.txt", "--out_dir=compact", cwd=tmp_path)
    return tmp_path / "compact"


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_a_lora_fine_tune_exports_with_its_adapters_merged(gpt2_shaped_run, tmp_path):
    base = gpt2_shaped_run / "out" / "trained.pth"
    out = run_script(
        "train.py",
        os.path.join(ROOT, "config", "tiny.py"),
        f"--data_dir={gpt2_shaped_run / 'data'}",
        f"--init_from={base}",
        "--lora_rank=4",
        "--bias=True",
        "--out_dir=lora",
        "--max_iters=4",
        "--eval_interval=4",
        "--learning_rate=0.05",  # large: the adapters must move the logits visibly
        cwd=tmp_path,
    )
    assert "LoRA rank 4" in out.stdout
    run_script("export.py", "--ckpt=lora/trained.pth", "--out=hf", cwd=tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    from tensegpt.checkpoint import load_model

    merged = load_model(str(tmp_path / "lora" / "trained.pth"))[0]
    before = load_model(str(base))[0]
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = merged(idx, idx)[0][..., :50257]
        assert torch.allclose(hf_model(idx).logits, ours, atol=1e-5, rtol=0)
        assert not torch.allclose(before(idx, idx)[0][..., :50257], ours, atol=1e-3)  # the adapters are in it
