"""
Exports a trained checkpoint as a Hugging Face folder that transformers, vLLM, TGI and
llama.cpp's converter load.

    python export.py --ckpt=out/trained.pth --out=hf-model

writes the model (config.json, model.safetensors, generation_config.json) and its tokenizer
(tokenizer.json, tokenizer_config.json, vocab.json, merges.txt):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf-model")
    tokenizer = AutoTokenizer.from_pretrained("hf-model")

The architecture follows the model's switches (tensegpt/hf.py): learned positions are
GPT-2 (GPT2LMHeadModel), rotary positions with RMSNorm and SwiGLU are Llama
(LlamaForCausalLM), and with QK-norm Qwen3 (Qwen3ForCausalLM); any other mix is refused,
naming the switch to change. The tokenizer is the one the model was trained with, GPT-2's
or the compact vocabulary cut out of it, as a byte-level BPE that gives the same ids
(tensegpt/hf_tokenizer.py); a chat model's tokenizer_config.json carries its chat template.
LoRA adapters are merged in; with --adapter_out=DIR they are written there instead, as a
PEFT folder for the base model in --out:

    python export.py --ckpt=out-lora/trained.pth --out=hf-base --adapter_out=hf-adapter

Before it writes anything, transformers loads the export and must compute the checkpoint's
own logits (to float32 rounding): a model.py edited into something the architecture does
not compute (an activation, a soft-cap), or a tensor with no place in it, is refused in a
line that names it. An output layer of its own (untied) is written as one.

With --format=gguf it writes one GGUF file instead, for llama.cpp, ollama and LM Studio
(tensegpt/gguf_export.py), its matrices F32, F16, BF16, Q8_0, Q5_0 or Q4_0 (--outtype):

    python export.py --ckpt=out/trained.pth --format=gguf --outtype=q8_0 --out=model.gguf

Needs the safetensors and transformers packages (pip install safetensors transformers),
and for GGUF the gguf package (pip install gguf).
"""

import fnmatch
import json
import os
import sys

from tensegpt import checkpoint as ckpt
from tensegpt import hf_tokenizer, lora
from tensegpt.common import UserError, atomic_write, check_writable_folder, main_guard, parse_config
from tensegpt.gguf_export import OUTTYPES, write_gguf
from tensegpt.hf import check_logits, export_architecture, peft_adapter, to_hf
from tensegpt.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, gpt2_file
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to export
    "format": "hf",  # 'hf' (a Hugging Face folder) or 'gguf' (one file for llama.cpp, ollama and LM Studio)
    "out": "",  # what to write: the folder (hf), the file (gguf); empty: hf-model or model.gguf
    "outtype": "f16",  # --format=gguf: the matrices as f32, f16, bf16, q8_0, q5_0 or q4_0 (norms, biases f32)
    "overwrite": False,  # True: replace the model files of a non-empty --out folder (other files stay), or the file
    "adapter_out": "",  # a LoRA fine-tune: its adapters as a PEFT folder here, the base model in --out; empty: merged
}
WRITES = [
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]
ARCHITECTURES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}
# what transformers may load a model or tokenizer from: removed on --overwrite, so no stale file wins
HF_MODEL_FILES = [
    "pytorch_model*.bin",
    "model-*.safetensors",
    "*.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "special_tokens_map.json",
    "added_tokens.json",
    "adapter_config.json",
    "adapter_model.safetensors",
]


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_options(config)
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("export.py writes safetensors: pip install safetensors") from None
    try:
        import transformers  # noqa: F401 - check_logits runs the export through it
    except ImportError:
        raise UserError("export.py checks what it writes with transformers: pip install transformers") from None
    checkpoint = ckpt.load(config["ckpt"])
    # gpt_config_of fills in the model keys a checkpoint lacks with GPTConfig's defaults
    model_config = vars(ckpt.gpt_config_of(checkpoint, config["ckpt"]))
    tokenizer_meta = checkpoint["tokenizer_meta"]
    architecture, problem = export_architecture(model_config)
    problem = problem or hf_tokenizer.exportable_tokenizer(tokenizer_meta)
    if problem:
        raise UserError(f"{config['ckpt']} cannot be exported: {problem}")
    tokenizer = tokenizer_from_meta(tokenizer_meta)
    # a chat model's answer ends with <|end|>; a text ends with end-of-text
    chat = hasattr(tokenizer, "end")
    eos = [tokenizer.end, tokenizer.eot] if chat else tokenizer.eot
    lora_settings, separate = checkpoint.get("lora"), bool(config["adapter_out"])
    if separate and not lora_settings:
        raise UserError(
            f"{config['ckpt']} has no LoRA adapters (it was not trained with --lora_rank): leave out --adapter_out"
        )
    model = ckpt.build_model(checkpoint, config["ckpt"], merge=not separate).eval()
    # the base and its adapters apart (PEFT), or one model with the adapters merged in
    weights, adapters = lora.split(model) if separate else (model.state_dict(), None)
    try:
        hf_config, tensors = to_hf(model_config, weights, tokenizer.vocab_size, tokenizer.eot, eos)
    except ValueError as e:
        raise UserError(f"{config['ckpt']} cannot be exported: {e}; nothing was written") from None
    # what is written must compute what model.py computes: transformers, the library that reads it, says
    base = model
    if separate:
        base = type(model)(model.config).eval()
        base.load_state_dict(weights)
    if problem := check_logits(base, hf_config, tensors, tokenizer.vocab_size):
        raise UserError(f"{config['ckpt']} cannot be exported: {problem}; nothing was written")
    if separate:
        adapter_config, adapter_tensors = peft_adapter(model_config, adapters, lora_settings, tokenizer.vocab_size)

    # the tokenizer the model was trained with, in the files transformers reads (and GGUF carries)
    tokenizer_json = hf_tokenizer.bpe_tokenizer_json(tokenizer_meta)
    tokenizer_config = hf_tokenizer.tokenizer_config(tokenizer_meta, model_config["block_size"])
    n_params = sum(t.numel() for t in tensors.values())
    summary = f"{ARCHITECTURES[architecture]}, {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size:,}"
    summary += ", chat template" if chat else ""
    if config["format"] == "gguf":
        name = os.path.basename(os.path.dirname(os.path.abspath(config["ckpt"])))
        outtype = config["outtype"]
        counts = write_gguf(config["out"], hf_config, tensors, tokenizer_json, tokenizer_config, outtype, name)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        print(f"wrote {config['out']} (GGUF, {summary}; tensors: {kinds})")
        return

    if tokenizer_meta["tokenizer"] == "gpt2":
        # GPT-2's own vocab.json and merges.txt, byte for byte
        vocab = read_bytes(gpt2_file("encoder.json", ENCODER_JSON_SHA256))
        merges = read_bytes(gpt2_file("vocab.bpe", VOCAB_BPE_SHA256))
    else:
        vocab, merges = hf_tokenizer.vocab_and_merges(tokenizer_json)
    generation = {"bos_token_id": tokenizer.eot, "eos_token_id": eos, "pad_token_id": tokenizer.eot}
    files = {
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
        "config.json": as_json(hf_config),
        "generation_config.json": as_json(generation),
        "tokenizer.json": as_json(tokenizer_json),
        "tokenizer_config.json": as_json(tokenizer_config),
        "vocab.json": vocab,
        "merges.txt": merges,
    }

    out = config["out"]
    check_writable_folder(out, "out")
    old = sorted(set(os.listdir(out)) - set(WRITES))
    if old and not config["overwrite"]:
        raise UserError(
            f"{out}/ already holds files ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''}): "
            "pass --overwrite=True to replace its model files, or another --out=DIR"
        )
    for name in old:  # another model's weights (pytorch_model.bin, ...) would load in place of ours
        if any(fnmatch.fnmatch(name, pattern) for pattern in HF_MODEL_FILES):
            os.remove(os.path.join(out, name))
    for name, data in files.items():
        atomic_write(os.path.join(out, name), lambda f, data=data: f.write(data))
    print(f"wrote {out}/config.json, model.safetensors ({summary}), {', '.join(list(files)[2:])}")
    if separate:
        adapter_out = config["adapter_out"]
        adapter_config["base_model_name_or_path"] = os.path.abspath(out)
        check_writable_folder(adapter_out, "adapter_out")
        adapter_weights = save(adapter_tensors, metadata={"format": "pt"})
        atomic_write(os.path.join(adapter_out, "adapter_model.safetensors"), lambda f: f.write(adapter_weights))
        atomic_write(os.path.join(adapter_out, "adapter_config.json"), lambda f: f.write(as_json(adapter_config)))
        targets = ", ".join(adapter_config["target_modules"])
        whole = " and the adapted embedding whole" if adapter_config["modules_to_save"] else ""
        print(f"wrote {adapter_out}/adapter_config.json, adapter_model.safetensors (PEFT LoRA on {targets}{whole})")


def check_options(config):
    """--format and what goes with it: the default --out of each, --outtype for GGUF only, GGUF's adapters merged."""
    if config["format"] not in ("hf", "gguf"):
        raise UserError(f"--format must be hf or gguf, got {config['format']!r}")
    if config["outtype"] not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {config['outtype']!r}")
    gguf = config["format"] == "gguf"
    config["out"] = config["out"] or ("model.gguf" if gguf else "hf-model")
    if not gguf and config["outtype"] != DEFAULTS["outtype"]:
        raise UserError("--outtype is for --format=gguf; a Hugging Face folder holds float32 weights")
    if gguf and config["adapter_out"]:
        raise UserError("a GGUF file holds the LoRA adapters merged in: leave out --adapter_out (or use --format=hf)")
    if gguf and os.path.isdir(config["out"]):
        raise UserError(f"--out={config['out']} is a folder; a GGUF export is one file: pass --out=model.gguf")
    if gguf and os.path.exists(config["out"]) and not config["overwrite"]:
        raise UserError(f"{config['out']} exists: pass --overwrite=True to replace it, or another --out=FILE")


def as_json(value):
    return json.dumps(value, indent=2, ensure_ascii=False).encode()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main_guard(main)
