"""
Every model export.py writes, loaded by transformers: the same ids from the tokenizer, the
same logits and greedy text from the model, the chat template's ids, and back again.
"""

import json

import pytest
import torch
from helpers import fails, run_script, tense_lines
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig
from tensegpt import lora
from tensegpt.chat import ChatTokenizer
from tensegpt.checkpoint import load_model, save
from tensegpt.common import UserError
from tensegpt.hf import load_hf
from tensegpt.hf_tokenizer import bpe_tokenizer_json, meta_from_folder
from tensegpt.tokenizer import GPT2, Char, CompactGPT2, Word

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install transformers)")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")

PROSE = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?'"
)
SAMPLES = [
    *tense_lines(300),
    PROSE,
    "naïve café, Zürich, 東京, emoji 🙂🚀, tabs\tand\r\nnewlines   and  spaces ",
    "",
    " leading space",
    "1234567890 3.14159 -42",
]


def compact_tokenizer():
    """The compact vocabulary of 300 tense.txt lines (no prose word), as prepare.py would cut it (min frequency 1)."""
    return CompactGPT2.from_used_ids(set(GPT2().encode("\n".join(tense_lines(300)))))


COMPACT = compact_tokenizer()
HF_TOKENIZERS = {
    "compact": (COMPACT, tokenizers.Tokenizer.from_str(json.dumps(bpe_tokenizer_json(COMPACT.meta())))),
    "gpt2": (GPT2(), tokenizers.Tokenizer.from_str(json.dumps(bpe_tokenizer_json(GPT2().meta())))),
}


@pytest.mark.parametrize("kind", ["compact", "gpt2"])
def test_the_exported_tokenizer_gives_the_same_ids_on_seen_and_unseen_text(kind):
    # (a typed "<|endoftext|>" is text here and the special token in transformers: docs/hugging-face.md)
    ours, theirs = HF_TOKENIZERS[kind]
    for text in SAMPLES:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == ours.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_unicode_gets_the_same_ids_from_both_tokenizers(text):
    for ours, theirs in HF_TOKENIZERS.values():
        assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text)


# ----------------------------------------------------------------------------- whole exports


SHAPES = {
    "gpt2": dict(pos_encoding="learned", bias=True),
    "gpt2 chat": dict(pos_encoding="learned"),
    "llama": dict(pos_encoding="rotary", activation="swiglu", norm="rmsnorm", n_kv_head=2),
    "llama with biases": dict(pos_encoding="rotary", activation="swiglu", norm="rmsnorm", bias=True),
    "qwen3": dict(pos_encoding="rotary", activation="swiglu", norm="rmsnorm", n_kv_head=1, qk_norm=True),
}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}


def random_checkpoint(path, tokenizer, **switches):
    """A small model of these switches with random weights (norms and biases too), saved as train.py would."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=-(-tokenizer.vocab_size // 64) * 64, block_size=64, n_layer=2, n_head=4,
                       n_embd=64, **switches)  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    save({"model": model.state_dict(), "model_config": config.__dict__, "tokenizer_meta": tokenizer.meta()}, path)
    return model.eval()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_exports_and_comes_back_with_the_same_logits_and_greedy_text(shape, tmp_path):
    tokenizer = ChatTokenizer(COMPACT) if "chat" in shape else COMPACT
    model = random_checkpoint(tmp_path / "model.pth", tokenizer, **SHAPES[shape])
    out = run_script("export.py", "--ckpt=model.pth", "--out=hf", cwd=tmp_path).stdout
    architecture = shape.split()[0]
    assert out.startswith(f"wrote hf/config.json, model.safetensors ({NAMES[architecture]}, ")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf_model).__name__ == ARCHITECTURES[architecture]
    assert hf_model.config.vocab_size == tokenizer.vocab_size

    text = "By next year, our teacher will have washed the car. Zebras 🙂"
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text)
    idx = torch.tensor([ids[:8], tokenizer.encode("They were not cooking dinner when we arrived.")[:8]])
    with torch.no_grad():
        ours = model(idx, idx)[0][..., : tokenizer.vocab_size]
        assert torch.allclose(hf_model(idx).logits, ours, atol=1e-5, rtol=0)
        generated = hf_model.generate(idx[:1, :4], max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert generated[0, 4:].tolist() == model.generate(idx[:1, :4], 16, greedy=True)[0, 4:].tolist()

    # and back: the folder imports as the same model, its tokenizer as the same tokenizer
    back = load_hf(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.allclose(back(idx, idx)[0], ours, atol=1e-6, rtol=0)
    assert meta_from_folder(str(tmp_path / "hf")) == tokenizer.meta()


def test_a_chat_export_renders_the_template_and_answers_like_the_checkpoint(tmp_path):
    tokenizer = ChatTokenizer(COMPACT)
    model = random_checkpoint(tmp_path / "chat.pth", tokenizer, pos_encoding="rotary", activation="swiglu",
                              norm="rmsnorm")  # fmt: skip
    run_script("export.py", "--ckpt=chat.pth", "--out=hf", cwd=tmp_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Negate: The baby is sleeping."},
        {"role": "assistant", "content": "The baby is not sleeping."},
        {"role": "user", "content": "Now as a question."},
    ]
    rendered = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.prompt(conversation)
    assert hf_tokenizer.apply_chat_template(conversation[:2], tokenize=False).endswith("<|end|>")
    # greedy answers stop at <|end|> (generation_config.json) and read the same
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([ids])
    theirs = hf_model.generate(prompt, max_new_tokens=20, do_sample=False)[0, len(ids) :]
    ours = model.generate(prompt, 20, greedy=True, stop_token=tokenizer.end)[0, len(ids) :]
    assert hf_tokenizer.decode(theirs, skip_special_tokens=True) == tokenizer.decode(ours.tolist())
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [tokenizer.end, tokenizer.eot]


def test_an_export_of_the_compact_vocabulary_fine_tunes_and_samples_from_its_folder(tmp_path):
    """--init_from=hf: reads the folder's tokenizer too; prepare.py --vocab_from takes the folder."""
    random_checkpoint(tmp_path / "model.pth", COMPACT, pos_encoding="rotary", activation="swiglu", norm="rmsnorm")
    run_script("export.py", "--ckpt=model.pth", "--out=hf", cwd=tmp_path)
    greedy = ["--start=The baby", "--greedy", "--num_samples=1", "--max_new_tokens=12"]
    direct = run_script("sample.py", "--ckpt=model.pth", *greedy, cwd=tmp_path).stdout
    assert run_script("sample.py", "--init_from=hf:hf", *greedy, cwd=tmp_path).stdout == direct
    (tmp_path / "in.txt").write_text("\n".join(tense_lines(200)) + "\n")
    run_script("prepare.py", "--input=in.txt", "--vocab_from=hf", cwd=tmp_path)
    out = run_script("train.py", "--init_from=hf:hf", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                     "--batch_size=4", "--block_size=32", cwd=tmp_path).stdout  # fmt: skip
    assert "initialising from the weights in hf (n_layer 2, n_head 4, n_embd 64" in out
    (tmp_path / "other.txt").write_text("\n".join(tense_lines(200)) + "\n")
    run_script("prepare.py", "--input=other.txt", "--full_vocab=True", "--out_dir=full", cwd=tmp_path)
    assert fails("train.py", "--init_from=hf:hf", "--data_dir=full", "--out_dir=o2", cwd=tmp_path) == (
        "error: the weights in hf read gpt2-compact ids, but full/ is gpt2 of another vocabulary: "
        "prepare it with --vocab_from=hf"
    )


@pytest.mark.parametrize(
    "shape,targets,chat",
    [
        ("gpt2", ["c_attn", "c_proj", "c_fc", "wte"], True),
        ("llama", ["c_attn", "c_proj", "c_fc"], False),
    ],
)
def test_lora_adapters_export_as_a_peft_folder_for_the_base(shape, targets, chat, tmp_path):
    """The base in --out, the adapters in --adapter_out; PeftModel over the base computes our merged model."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    tokenizer = ChatTokenizer(COMPACT) if chat else COMPACT
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=-(-tokenizer.vocab_size // 64) * 64, block_size=64, n_layer=2, n_head=4, n_embd=64,
                       **SHAPES[shape])  # fmt: skip
    model = GPT(config)
    # chat tokens are new rows the fine-tune trains whole (fresh_from), beside the adapters
    settings = {"rank": 4, "alpha": 8.0, "targets": targets, "fresh_from": COMPACT.vocab_size}
    lora.add_adapters(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "fresh" in name:
                p.normal_(0.0, 0.05)
    checkpoint = {"model": model.state_dict(), "model_config": config.__dict__, "tokenizer_meta": tokenizer.meta()}
    save({**checkpoint, "lora": {**settings, "base": "base.pth"}}, tmp_path / "lora.pth")
    out = run_script("export.py", "--ckpt=lora.pth", "--out=base", "--adapter_out=adapter", cwd=tmp_path).stdout
    assert out.splitlines()[1].startswith("wrote adapter/adapter_config.json, adapter_model.safetensors (PEFT LoRA on")
    merged = load_model(str(tmp_path / "lora.pth"))[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = merged(idx, idx)[0][..., : tokenizer.vocab_size]
        assert not torch.allclose(base(idx).logits, ours, atol=1e-2)  # the base alone is not the fine-tune
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert torch.allclose(adapted(idx).logits, ours, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    random_checkpoint(tmp_path / "plain.pth", tokenizer, **SHAPES[shape])
    assert fails("export.py", "--ckpt=plain.pth", "--out=o", "--adapter_out=a", cwd=tmp_path) == (
        "error: plain.pth has no LoRA adapters (it was not trained with --lora_rank): leave out --adapter_out"
    )


# ----------------------------------------------------------------------------- what cannot be exported


@pytest.mark.parametrize(
    "switches,problem",
    [
        (
            dict(pos_encoding="sinusoidal"),
            "pos_encoding is 'sinusoidal', which no standard architecture has: "
            "train with --pos_encoding=learned (GPT-2) or --pos_encoding=rotary (Llama, Qwen3)",
        ),
        (
            dict(pos_encoding="rotary"),
            "activation is 'gelu'; with rotary positions that is Llama or Qwen3, which use SwiGLU: "
            "train with --activation=swiglu; norm is 'layernorm'; Llama and Qwen3 use RMSNorm: "
            "train with --norm=rmsnorm",
        ),
        (dict(activation="swiglu"), "activation is 'swiglu'; GPT-2 uses GELU: train with --activation=gelu"),
        (dict(norm="rmsnorm"), "norm is 'rmsnorm'; GPT-2 uses LayerNorm: train with --norm=layernorm"),
        (
            dict(n_kv_head=1, qk_norm=True, activation="relu2"),
            "activation is 'relu2'; GPT-2 uses GELU: train with --activation=gelu; n_kv_head is 1 (grouped-query "
            "attention); GPT-2 gives every head its keys and values: train with --n_kv_head=0 (or, for Llama, "
            "--pos_encoding=rotary); qk_norm is on; GPT-2 does not normalise queries and keys: "
            "train with --qk_norm=False (or, for Qwen3, --pos_encoding=rotary)",
        ),
        (
            dict(pos_encoding="rotary", activation="swiglu", norm="rmsnorm", qk_norm=True, bias=True),
            "QK-norm makes it Qwen3, whose feed-forward has no biases: train with --bias=False",
        ),
    ],
)
def test_a_mix_no_standard_architecture_has_is_refused_naming_the_switch(switches, problem, tmp_path):
    random_checkpoint(tmp_path / "odd.pth", COMPACT, **switches)
    assert (
        fails("export.py", "--ckpt=odd.pth", "--out=hf", cwd=tmp_path)
        == f"error: odd.pth cannot be exported: {problem}"
    )
    assert not (tmp_path / "hf").exists()


def test_char_and_word_vocabularies_are_refused_saying_why(tmp_path):
    random_checkpoint(tmp_path / "char.pth", Char("abc ."))
    random_checkpoint(tmp_path / "word.pth", Word(["the", "baby"]))
    assert fails("export.py", "--ckpt=char.pth", "--out=hf", cwd=tmp_path) == (
        "error: char.pth cannot be exported: its char vocabulary drops the characters it lacks, which no "
        "`tokenizers` model does: to export, prepare the text with --tokenizer=gpt2 and train again"
    )
    assert fails("export.py", "--ckpt=word.pth", "--out=hf", cwd=tmp_path).startswith(
        "error: word.pth cannot be exported: its word vocabulary lowercases and splits with Python's \\w"
    )


@pytest.mark.parametrize(
    "setting,problem",
    [
        (
            {"rope_theta": 500000.0, "rope_parameters": None},
            "rope_theta is 500000.0, but model.py implements only 10000",
        ),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps is 1e-06, but model.py implements only 1e-5"),
        ({"tie_word_embeddings": False}, "but model.py ties it to the token embedding: remove the line"),
    ],
)
def test_a_llama_folder_with_what_model_py_lacks_is_refused(setting, problem, tmp_path):
    random_checkpoint(tmp_path / "model.pth", COMPACT, pos_encoding="rotary", activation="swiglu", norm="rmsnorm")
    run_script("export.py", "--ckpt=model.pth", "--out=hf", cwd=tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(setting)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=problem.replace("(", r"\(")):
        load_hf(str(tmp_path / "hf"))


def test_the_model_the_quick_start_trains_exports(tiny_run, tmp_path):
    """A compact-vocabulary checkpoint of train.py (GPT-2's block, no biases) loads in transformers."""
    ckpt = tiny_run / "out" / "trained.pth"
    run_script("export.py", f"--ckpt={ckpt}", "--out=hf", cwd=tmp_path)
    model, tokenizer, _ = load_model(str(ckpt))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([tokenizer.encode("Every weekend, our teacher washes the car.")])
    with torch.no_grad():
        assert torch.allclose(hf_model(idx).logits, model(idx, idx)[0][..., : tokenizer.vocab_size], atol=1e-5)
