"""
The fork suite: edits a learner makes to a copy of model.py, each run through the stages.

Each fork is the project copied into a folder with its model.py edited (the edit asserts the
text it replaces, so a change to model.py that moves it fails here first). In that folder:
train (tiny), sample, eval, export and read the export back, serve's engine and serve.py.
Every stage either works (cached greedy text equal to uncached, the engine's logits equal to
the model's own, the export's logits equal to the checkpoint's) or stops with a one-line
error that names what the fork changed: never a traceback, never a silently other number.
"""

import importlib.util
import json
import os
import shutil

import llama_cpp
import pytest
import torch
from helpers import ROOT, run_script, tense_lines

TINY = ["config/tiny.py", "--max_iters=20", "--eval_interval=20", "--eval_iters=2", "--out_dir=out"]


def edit(source, old, new):
    assert old in source, f"model.py no longer has {old!r}: update the fork suite"
    return source.replace(old, new)


# name -> (the edit of model.py's source, what export.py says: None where it exports)
FORKS = {
    # a learnable gate on each residual branch, started at zero: the model starts as the identity
    "zero_gate": (
        lambda s: edit(
            edit(
                s,
                "        self.mlp = FeedForward(config)\n",
                "        self.mlp = FeedForward(config)\n        self.gate = nn.Parameter(torch.zeros(()))\n",
            ),
            "        x = x + self.mlp(self.ln_2(x))",
            "        x = x + self.gate * self.mlp(self.ln_2(x))",
        ),  # fmt: skip
        "blocks.0.gate (), blocks.1.gate () of model.py have no place in a gpt2 model",
    ),
    # Gemma's soft-cap on the logits, in the one place logits are made
    "soft_cap": (
        lambda s: edit(
            s, "        return self.lm_head(x)\n", "        return 3.0 * torch.tanh(self.lm_head(x) / 3.0)\n"
        ),
        "computes other logits than model.py from these weights",
    ),
    # the output layer a matrix of its own
    "untied": (
        lambda s: edit(s, "        self.lm_head.weight = self.wte.weight\n", ""),
        None,
    ),
    # a zero-initialised output projection (as some recipes start residual branches)
    "zero_proj": (
        lambda s: edit(
            s,
            "        self.c_proj = gpt2_init(nn.Linear(config.d_ff, config.n_embd, bias=config.bias), residual_std)\n",
            "        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)\n"
            "        nn.init.zeros_(self.c_proj.weight)\n",
        ),
        None,
    ),
    # another activation, written into the code rather than chosen by the config
    "silu": (
        lambda s: edit(s, '            h = F.gelu(h, approximate="tanh")', "            h = F.silu(h)"),
        "computes other logits than model.py from these weights",
    ),
    # a new GPTConfig field, used in forward: a train.py --key=value by itself
    "new_field": (
        lambda s: edit(
            edit(s, '    attention: str = "sdpa"\n', '    attention: str = "sdpa"\n    embedding_scale: float = 1.0\n'),
            "        x = self.wte(idx)  # (B, T, C)\n",
            "        x = self.wte(idx) * self.config.embedding_scale  # (B, T, C)\n",
        ),
        "computes other logits than model.py from these weights",
    ),
    # a renamed submodule
    "renamed": (
        lambda s: edit(
            edit(s, "        self.mlp = FeedForward(config)\n", "        self.ffn = FeedForward(config)\n"),
            "        x = x + self.mlp(self.ln_2(x))",
            "        x = x + self.ffn(self.ln_2(x))",
        ),
        "model.py has no blocks.0.mlp.c_fc.weight",
    ),
    # nanoGPT's attention before its KV cache: causal over its own T tokens, the mask it is given ignored
    "textbook_attention": (
        lambda s: edit(
            s,
            "attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=group > 1",
            "dropout_p=dropout, is_causal=True, enable_gqa=group > 1",
        ),
        None,
    ),
}
CACHE_BROKEN = {"textbook_attention"}
SCALED = {"new_field": ["--embedding_scale=2.0"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fork_data")
    (folder / "corpus.txt").write_text("\n".join(tense_lines(1500)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=corpus.txt", cwd=folder)
    return folder / "data"


def make_fork(folder, name):
    """The project copied into folder with its model.py edited as the fork name says; returns the model module."""
    for entry in os.listdir(ROOT):
        if entry.endswith(".py") or entry in ("tensegpt", "config"):
            copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, entry)) else shutil.copy
            copy(os.path.join(ROOT, entry), folder / entry)
    with open(folder / "model.py", encoding="utf-8") as f:
        source = FORKS[name][0](f.read())
    (folder / "model.py").write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"fork_{name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script(folder, name, *args, check=True, timeout=180):
    return run_script(str(folder / name), *args, cwd=folder, check=check, timeout=timeout)


def one_line_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["zero_gate", "zero_proj"])
def test_a_forks_own_initialisation_is_kept(name, tmp_path):
    fork = make_fork(tmp_path, name)
    torch.manual_seed(0)
    model = fork.GPT(fork.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    if name == "zero_gate":
        assert all(float(block.gate.detach()) == 0.0 for block in model.blocks)
    else:
        assert all(not block.mlp.c_proj.weight.any() for block in model.blocks)
    # and GPT-2's rule still reaches what it is meant for
    assert 0.015 < float(model.blocks[0].attn.c_attn.weight.std()) < 0.025


def test_an_untied_fork_exports_and_loads_untied(tmp_path):
    """The untied output layer goes out as lm_head.weight, tie_word_embeddings false, and comes back untied."""
    fork = make_fork(tmp_path, "untied")
    from tensegpt.hf import to_hf

    torch.manual_seed(0)
    model = fork.GPT(fork.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    assert model.lm_head.weight is not model.wte.weight
    config, tensors = to_hf(vars(model.config), model.state_dict(), 60, 0, 0)
    assert config["tie_word_embeddings"] is False
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight[:60])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORKS))
def test_every_stage_works_or_names_what_the_fork_changed(name, prepared, tmp_path):
    fork = make_fork(tmp_path, name)
    shutil.copytree(prepared, tmp_path / "data")
    exported = FORKS[name][1]

    # train: always works (a new GPTConfig field is an option of its own)
    trained = script(tmp_path, "train.py", *TINY, *SCALED.get(name, []))
    assert "Traceback" not in trained.stderr
    saved = torch.load(tmp_path / "out" / "trained.pth", weights_only=True)
    if name == "new_field":
        assert saved["model_config"]["embedding_scale"] == 2.0
    if name == "untied":
        assert not torch.equal(saved["model"]["lm_head.weight"], saved["model"]["wte.weight"])

    if name in CACHE_BROKEN:
        # sample, eval and serve read the model through its cache and the engine: they stop, naming the contract
        for stage, args in (("sample.py", ["--greedy=True", "--num_samples=1"]), ("eval.py", []), ("serve.py", [])):
            result = script(tmp_path, stage, "--ckpt=out/trained.pth", *args, check=False)
            one_line_error(result, "one token after a KV cache gets other log-probabilities", "cache.update")
        return

    # sample: greedy text, cached (sample.py) equal to the whole window recomputed each token
    greedy = ["--greedy=True", "--num_samples=1", "--max_new_tokens=20", "--start=The"]
    text = script(tmp_path, "sample.py", "--ckpt=out/trained.pth", *greedy).stdout
    state = {k: v for k, v in saved["model"].items()}
    model = fork.GPT(fork.GPTConfig(**saved["model_config"])).eval()
    model.load_state_dict(state)
    prompt = torch.tensor([[464]]) if saved["tokenizer_meta"]["tokenizer"] == "gpt2" else None
    if prompt is not None:
        cached = model.generate(prompt, 12, greedy=True)
        assert torch.equal(cached, model.generate(prompt, 12, greedy=True, use_cache=False))

    # the engine (serve.py's): two sequences of other lengths decoded together get the model's own log-probabilities
    from tensegpt.model_check import check_engine

    check_engine(model)

    # eval: its numbers come out
    report = json.loads(script(tmp_path, "eval.py", "--ckpt=out/trained.pth", "--num_samples=10",
                               "--time_prompts=12", "--probe_per_tense=1", "--json=True").stdout)  # fmt: skip
    assert report["bits_per_byte"] > 0

    # export: written and read back to the same greedy text, or refused in a line that names the difference
    result = script(tmp_path, "export.py", "--ckpt=out/trained.pth", "--out=hf", check=False)
    as_gguf = script(tmp_path, "export.py", "--ckpt=out/trained.pth", "--format=gguf", "--outtype=f32", check=False)
    if exported is not None:
        one_line_error(result, exported, "nothing was written")
        one_line_error(as_gguf, exported, "nothing was written")
        assert not (tmp_path / "hf" / "model.safetensors").exists() and not (tmp_path / "model.gguf").exists()
        return
    assert result.returncode == 0 and as_gguf.returncode == 0, result.stderr + as_gguf.stderr
    back = script(tmp_path, "sample.py", "--init_from=hf:hf", *greedy).stdout
    assert back == text
    # and llama.cpp, reading the GGUF file, writes the same greedy text
    from tensegpt.tokenizer import from_meta

    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=64, verbose=False, n_threads=1)
    reply = llm.create_completion(prompt=from_meta(saved["tokenizer_meta"]).encode("The"), max_tokens=20,
                                  temperature=0.0, repeat_penalty=1.0)  # fmt: skip
    assert "The" + reply["choices"][0]["text"] == text.strip()
    if name == "untied":
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
