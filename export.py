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
import json
import os
import shutil
import sys

from common import UserError, atomic_write, load_checkpoint, main_guard, parse_config
from hf import check_exportable, to_hf
from tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, gpt2_file

DEFAULTS = {"ckpt": "out/trained.pth", "out": "hf-model"}


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("export.py writes safetensors: pip install safetensors") from None
    checkpoint = load_checkpoint(config["ckpt"])
    problem = check_exportable(checkpoint["model_config"], checkpoint["tokenizer"]["tokenizer"])
    if problem:
        raise UserError(f"{config['ckpt']} is not GPT-2 compatible: {problem}")
    hf_config, tensors = to_hf(checkpoint["model_config"], checkpoint["model"])

    out = config["out"]
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "model.safetensors"), lambda f: f.write(save(tensors, metadata={"format": "pt"})))
        atomic_write(os.path.join(out, "config.json"), lambda f: f.write(json.dumps(hf_config, indent=2).encode()))
        # GPT-2's tokenizer files under the names transformers looks for
        for source, name, digest in (("encoder.json", "vocab.json", ENCODER_JSON_SHA256), ("vocab.bpe", "merges.txt", VOCAB_BPE_SHA256)):
            with open(gpt2_file(source, digest), "rb") as src:
                atomic_write(os.path.join(out, name), lambda f, src=src: shutil.copyfileobj(src, f))
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}); choose another folder with --out=DIR") from None
    n_params = sum(t.numel() for t in tensors.values())
    print(f"wrote {out}/config.json, model.safetensors ({n_params / 1e6:.2f}M parameters), vocab.json, merges.txt")


if __name__ == "__main__":
    main_guard(main)
