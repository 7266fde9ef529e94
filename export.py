"""
Exports a trained checkpoint as a Hugging Face GPT-2 folder.

    python export.py --ckpt=out/trained.pth --out=hf-model

writes config.json, model.safetensors, and GPT-2's tokenizer files (vocab.json,
merges.txt) into the folder, which transformers then loads:

    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    model = GPT2LMHeadModel.from_pretrained("hf-model")

Only a GPT-2 shaped model converts: learned positions, GELU, and GPT-2's own token ids
(prepare.py --full_vocab=True). A model trained with bias=False exports with zero
biases, which computes the same. Needs the safetensors package (pip install safetensors).
"""

import fnmatch
import json
import os
import shutil
import sys

from tensegpt import checkpoint as ckpt
from tensegpt.common import UserError, atomic_write, check_writable_folder, main_guard, parse_config
from tensegpt.hf import check_exportable, to_hf
from tensegpt.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, gpt2_file

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to export
    "out": "hf-model",  # the folder to write; one that holds other files needs --overwrite=True
    "overwrite": False,  # True: replace the model files of a non-empty --out folder (other files stay)
}
WRITES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
# what transformers may load a model or tokenizer from: removed on --overwrite, so no stale file wins
HF_MODEL_FILES = [
    "pytorch_model*.bin",
    "model-*.safetensors",
    "*.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("export.py writes safetensors: pip install safetensors") from None
    checkpoint = ckpt.load(config["ckpt"])
    # gpt_config_of fills in the model keys a checkpoint lacks with GPTConfig's defaults
    model_config = vars(ckpt.gpt_config_of(checkpoint, config["ckpt"]))
    problem = check_exportable(model_config, checkpoint["tokenizer_meta"]["tokenizer"])
    if problem:
        raise UserError(f"{config['ckpt']} is not GPT-2 compatible: {problem}")
    weights = ckpt.build_model(checkpoint, config["ckpt"]).state_dict()  # LoRA adapters merged in
    hf_config, tensors = to_hf(model_config, weights)

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
    atomic_write(os.path.join(out, "model.safetensors"), lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(os.path.join(out, "config.json"), lambda f: f.write(json.dumps(hf_config, indent=2).encode()))
    # GPT-2's tokenizer files under the names transformers looks for
    for source, name, digest in (
        ("encoder.json", "vocab.json", ENCODER_JSON_SHA256),
        ("vocab.bpe", "merges.txt", VOCAB_BPE_SHA256),
    ):
        with open(gpt2_file(source, digest), "rb") as src:
            atomic_write(os.path.join(out, name), lambda f, src=src: shutil.copyfileobj(src, f))
    n_params = sum(t.numel() for t in tensors.values())
    print(f"wrote {out}/config.json, model.safetensors ({n_params / 1e6:.2f}M parameters), vocab.json, merges.txt")


if __name__ == "__main__":
    main_guard(main)
