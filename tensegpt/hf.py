"""
To and from Hugging Face's GPT-2 layout: a folder with config.json and model.safetensors
(or pytorch_model.bin), as transformers' GPT2LMHeadModel saves and loads it.

With pos_encoding='learned', activation='gelu' (GPT-2's tanh approximation), GPT-2's
BPE ids and layer norms of epsilon 1e-5, model.py computes exactly what GPT-2 does. The
only difference in the weights is the layout of the matrices: GPT-2 keeps them as
"Conv1D" (in, out), nn.Linear as (out, in), so they are transposed on the way.
transformers itself is not needed. hub_folder() is the one place that downloads: GPT-2's
weights by name, through huggingface_hub (the library users already have for that job),
which keeps them in its cache and reads them from there when the machine is offline.
"""

import json
import os
import struct
from dataclasses import replace

import torch

from model import GPT, GPTConfig, check_config
from tensegpt.common import UserError

# The names are the same on both sides (model.py follows GPT-2's); per block, the value
# says whether the tensor is a matrix GPT-2 stores transposed (Conv1D).
BLOCK_KEYS = {
    "ln_1.weight": False,
    "ln_1.bias": False,
    "attn.c_attn.weight": True,
    "attn.c_attn.bias": False,
    "attn.c_proj.weight": True,
    "attn.c_proj.bias": False,
    "ln_2.weight": False,
    "ln_2.bias": False,
    "mlp.c_fc.weight": True,
    "mlp.c_fc.bias": False,
    "mlp.c_proj.weight": True,
    "mlp.c_proj.bias": False,
}
TOP_KEYS = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def read_safetensors(path):
    """
    The tensors of a .safetensors file. The format is simple enough to read by hand
    (8 bytes of header length, a JSON header of names, dtypes, shapes and byte ranges,
    then the raw data), which spares training and sampling the dependency.
    """
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
            data = f.read()
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not handle")
            start, end = info["data_offsets"]
            flat = torch.frombuffer(bytearray(data[start:end]), dtype=SAFETENSORS_DTYPES[info["dtype"]])
            tensors[name] = flat.reshape(info["shape"]).float()
    except (
        struct.error,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RuntimeError,
        MemoryError,
        OverflowError,
    ) as e:
        raise UserError(
            f"{path} is not a readable safetensors file (damaged or truncated: {e.__class__.__name__}); "
            "save or copy the model again"
        ) from None
    return tensors


def hub_folder(name):
    """
    The local folder of GPT-2's weights (name: gpt2, gpt2-medium, gpt2-large or gpt2-xl):
    downloaded into the Hugging Face cache when the machine is online, read from the cache
    when it is not (or HF_HUB_OFFLINE=1), or a one-line error that says how to get it.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"--init_from={name} downloads through huggingface_hub: pip install huggingface_hub") from None
    files = ["config.json", "model.safetensors"]
    try:
        return snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=files)
    except Exception as online:  # offline, refused, or not found: try the cache
        try:
            return snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=files, local_files_only=True)
        except Exception:
            why = str(online).splitlines()[0][:120] if str(online) else online.__class__.__name__
            raise UserError(
                f"GPT-2 weights {name!r} are neither in the Hugging Face cache nor downloadable here ({why}): "
                f"run once online, or download them elsewhere (huggingface-cli download openai-community/{name} "
                f"config.json model.safetensors --local-dir {name}), "
                f"copy the folder here and pass --init_from=hf:{name}"
            ) from None


def load_hf(folder, block_size=None, dropout=None):
    """
    A model.GPT with the weights of a Hugging Face GPT-2 folder. block_size: keep only
    the first positions (a shorter context to fine-tune with); dropout: in place of GPT-2's.
    """
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(
            f"no Hugging Face model in {folder}: put its config.json and model.safetensors "
            "(or pytorch_model.bin) in that folder (nothing is downloaded)"
        )
    try:
        with open(config_path, "rb") as f:
            hf = json.loads(f.read())
    except ValueError as e:
        raise UserError(f"{config_path} is not JSON ({e}); save or copy the model again") from None
    if not isinstance(hf, dict):
        raise UserError(
            f"{config_path} holds a {type(hf).__name__}, not a JSON object of settings; save or copy the model again"
        )
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{config_path} describes a {hf.get('model_type')!r} model; only GPT-2 ('gpt2') converts")
    activation = hf.get("activation_function", "gelu_new")
    checks = {
        "activation_function": (activation in ("gelu_new", "gelu_pytorch_tanh", "relu"), "gelu_new or relu"),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "1e-5"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), "true"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        "reorder_and_upcast_attn": (not hf.get("reorder_and_upcast_attn", False), "false"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), "true"),
    }
    for key, (ok, wanted) in checks.items():
        if not ok:
            raise UserError(f"{config_path}: {key} is {hf.get(key)!r}, but model.py implements only {wanted}")
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):  # before GPTConfig sees them
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] <= 0:
            raise UserError(
                f"{config_path}: {key} is {hf.get(key)!r}, not a positive whole number; save or copy the model again"
            )
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        d_ff=hf.get("n_inner") or 0,
        dropout=hf.get("resid_pdrop", 0.0),
        bias=True,
        pos_encoding="learned",
        activation="relu" if activation == "relu" else "gelu",
    )
    problems = check_config(config)
    if problems:
        raise UserError(f"{config_path}: {'; '.join(problems)}")

    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        hf_state = read_safetensors(safetensors_path)
    elif os.path.isfile(bin_path):
        try:
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # refused pickles and damaged archives alike
            raise UserError(
                f"{bin_path} is not a readable weights-only checkpoint ({e.__class__.__name__}); "
                "use model.safetensors, or save the model again"
            ) from None
    else:
        raise UserError(
            f"{folder} has a config.json but no weights: put model.safetensors or pytorch_model.bin beside it"
        )
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (the original release) "h.0..."
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}

    state = {}
    try:
        for name in TOP_KEYS:
            state[name] = hf_state[name]
        for i in range(config.n_layer):
            for name, transpose in BLOCK_KEYS.items():
                tensor = hf_state[f"h.{i}.{name}"]
                state[f"blocks.{i}.{name}"] = tensor.t().contiguous() if transpose else tensor
    except KeyError as e:
        raise UserError(f"{folder}: the weights lack {e.args[0]}; is this a GPT-2 checkpoint?") from None
    state["lm_head.weight"] = state["wte.weight"]  # tied
    with torch.device("meta"):  # the shapes config.json promises, without allocating a model
        expected = GPT(config).state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, "
                f"but config.json gives {tuple(expected[name].shape)}; "
                "the weights and config.json do not belong together"
            )
    if block_size is not None:
        if block_size > config.block_size:
            raise UserError(f"--block_size={block_size} is longer than the {config.block_size} positions of {folder}")
        state["wpe.weight"] = state["wpe.weight"][:block_size]
        config = replace(config, block_size=block_size)
    config = replace(config, dropout=config.dropout if dropout is None else dropout)
    model = GPT(config)
    model.load_state_dict(state)
    return model


def check_exportable(model_config, tokenizer_name):
    """Why a checkpoint cannot be GPT-2, as a message with the fix, or None. model_config: a dict."""
    c = model_config
    fixes = [
        (
            c["pos_encoding"] == "learned",
            f"pos_encoding is {c['pos_encoding']!r}; GPT-2 learns its positions: train with --pos_encoding=learned",
        ),
        (
            c["activation"] in ("gelu", "relu"),
            f"activation is {c['activation']!r}; GPT-2 uses GELU: train with --activation=gelu",
        ),
        (
            c["norm"] == "layernorm",
            f"norm is {c['norm']!r}; GPT-2 uses LayerNorm: train with --norm=layernorm",
        ),
        (
            c["n_kv_head"] == c["n_head"],
            f"n_kv_head is {c['n_kv_head']} (grouped-query attention); GPT-2 gives every head its keys and values: "
            "train with --n_kv_head=0",
        ),
        (
            not c["qk_norm"],
            "qk_norm is on; GPT-2 does not normalise queries and keys: train with --qk_norm=False",
        ),
        (
            tokenizer_name == "gpt2",
            f"the tokenizer is {tokenizer_name!r}; GPT-2 needs its own 50,257 ids: "
            "prepare with --full_vocab=True (and --tokenizer=gpt2)",
        ),
    ]
    return "; ".join(message for ok, message in fixes if not ok) or None


def to_hf(model_config, state, vocab_size=50257):
    """(config.json dict, tensors by GPT-2 name) for a model.py checkpoint of GPT-2's architecture."""
    c = model_config
    tensors = {}
    for name in TOP_KEYS:
        if name in state:
            tensors[f"transformer.{name}"] = state[name]
        else:  # bias=False: a LayerNorm without bias is one with bias 0
            tensors[f"transformer.{name}"] = torch.zeros(c["n_embd"])
    # the model's padding rows (never a target) are left out: GPT-2 has exactly 50,257 tokens
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:vocab_size]
    for i in range(c["n_layer"]):
        for name, transpose in BLOCK_KEYS.items():
            key = f"blocks.{i}.{name}"
            if key in state:
                tensor = state[key].t() if transpose else state[key]
            else:  # bias=False: zeros act the same
                weight = state[key.replace(".bias", ".weight")]
                tensor = torch.zeros(weight.size(0))
            tensors[f"transformer.h.{i}.{name}"] = tensor.float().contiguous()
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab_size,
        "n_positions": c["block_size"],
        "n_ctx": c["block_size"],
        "n_embd": c["n_embd"],
        "n_layer": c["n_layer"],
        "n_head": c["n_head"],
        "n_inner": c["d_ff"],
        "activation_function": "relu" if c["activation"] == "relu" else "gelu_new",
        "resid_pdrop": c["dropout"],
        "embd_pdrop": c["dropout"],
        "attn_pdrop": c["dropout"],
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    return config, tensors
