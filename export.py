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

Needs the safetensors and transformers packages (pip install safetensors transformers).
"""

import fnmatch
import json
import os
import sys

from tensegpt import checkpoint as ckpt
from tensegpt import hf_tokenizer, lora
from tensegpt.common import UserError, atomic_write, check_writable_folder, main_guard, parse_config
from tensegpt.hf import check_logits, export_architecture, peft_adapter, to_hf
from tensegpt.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, gpt2_file
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to export
    "out": "hf-model",  # the folder to write; one that holds other files needs --overwrite=True
    "overwrite": False,  # True: replace the model files of a non-empty --out folder (other files stay)
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

    # the tokenizer the model was trained with, in the files transformers reads
    tokenizer_json = hf_tokenizer.bpe_tokenizer_json(tokenizer_meta)
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
        "tokenizer_config.json": as_json(hf_tokenizer.tokenizer_config(tokenizer_meta, model_config["block_size"])),
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
    n_params = sum(t.numel() for t in tensors.values())
    print(
        f"wrote {out}/config.json, model.safetensors ({ARCHITECTURES[architecture]}, {n_params / 1e6:.2f}M parameters, "
        f"vocab {tokenizer.vocab_size:,}{', chat template' if chat else ''}), {', '.join(list(files)[2:])}"
    )
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


def as_json(value):
    return json.dumps(value, indent=2, ensure_ascii=False).encode()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main_guard(main)
