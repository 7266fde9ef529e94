"""
To and from Hugging Face's layouts: a folder with config.json and model.safetensors (or
pytorch_model.bin), as transformers' save_pretrained writes it, for the three architectures
model.py's switches can be.

GPT-2: pos_encoding='learned', activation='gelu' (GPT-2's tanh approximation) or 'relu',
LayerNorm of epsilon 1e-5. The only difference in the weights is the layout of the
matrices: GPT-2 keeps them as "Conv1D" (in, out), nn.Linear as (out, in), so they are
transposed on the way. Llama: pos_encoding='rotary', activation='swiglu', norm='rmsnorm',
any n_kv_head; Qwen3: the same with qk_norm. Their weights keep nn.Linear's layout; q, k, v
and SwiGLU's two halves are separate matrices there, one here. export_architecture says
which a config is, or which switch to change.

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
    A model.GPT with the weights of a Hugging Face folder of GPT-2, Llama or Qwen3 (what
    export.py writes). block_size: keep only the first positions (a shorter context to
    fine-tune with); dropout: in place of the folder's.
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
    except (ValueError, RecursionError) as e:
        raise UserError(f"{config_path} is not JSON ({e}); save or copy the model again") from None
    if not isinstance(hf, dict):
        raise UserError(
            f"{config_path} holds a {type(hf).__name__}, not a JSON object of settings; save or copy the model again"
        )
    kind = hf.get("model_type")
    if kind not in ("gpt2", "llama", "qwen3"):
        raise UserError(
            f"{config_path} describes a {kind!r} model; GPT-2 ('gpt2'), Llama ('llama') and Qwen3 ('qwen3') convert"
        )
    config = gpt2_config(hf, config_path) if kind == "gpt2" else llama_config(hf, config_path)
    problems = check_config(config)
    if problems:
        raise UserError(f"{config_path}: {'; '.join(problems)}")

    hf_state = read_weights(folder)
    try:
        state = from_gpt2(hf_state, config) if kind == "gpt2" else from_llama(hf_state, config)
    except KeyError as e:
        raise UserError(f"{folder}: the weights lack {e.args[0]}; is this a {kind} checkpoint?") from None
    # the output layer: the embedding (tied), or a matrix of its own (tie_word_embeddings false: Llama's default)
    tied = hf.get("tie_word_embeddings", kind == "gpt2")
    untied = hf_state.get("lm_head.weight")
    state["lm_head.weight"] = state["wte.weight"] if tied or untied is None else untied
    with torch.device("meta"):  # the shapes config.json promises, without allocating a model
        shapes = GPT(config)
    expected = shapes.state_dict()
    if not tied and shapes.lm_head.weight is shapes.wte.weight:
        raise UserError(
            f"{folder}: its output layer is a matrix of its own (tie_word_embeddings false), but model.py ties it to "
            "the token embedding: remove the line `self.lm_head.weight = self.wte.weight` in model.py to load it"
        )
    for name in expected:
        if name not in state:
            raise UserError(f"{folder}: model.py has {name}, which a {kind} model has no place for: nothing loads it")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, but config.json gives "
                f"{tuple(expected[name].shape)}; the weights and config.json do not belong together"
            )
    if block_size is not None:
        if block_size > config.block_size:
            raise UserError(f"--block_size={block_size} is longer than the {config.block_size} positions of {folder}")
        if "wpe.weight" in state:
            state["wpe.weight"] = state["wpe.weight"][:block_size]
        config = replace(config, block_size=block_size)
    config = replace(config, dropout=config.dropout if dropout is None else dropout)
    model = GPT(config)
    model.load_state_dict(state)
    return model


def refuse_unless(checks, settings, config_path):
    """checks: {key: (ok, what model.py implements)}; the first that fails, with its setting, as a UserError."""
    for key, (ok, wanted) in checks.items():
        if not ok:
            raise UserError(f"{config_path}: {key} is {settings.get(key)!r}, but model.py implements only {wanted}")


def whole_numbers(hf, keys, config_path):
    for key in keys:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] <= 0:
            raise UserError(
                f"{config_path}: {key} is {hf.get(key)!r}, not a positive whole number; save or copy the model again"
            )


def gpt2_config(hf, config_path):
    activation = hf.get("activation_function", "gelu_new")
    refuse_unless(
        {
            "activation_function": (activation in ("gelu_new", "gelu_pytorch_tanh", "relu"), "gelu_new or relu"),
            "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "1e-5"),
            "scale_attn_weights": (hf.get("scale_attn_weights", True), "true"),
            "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
            "reorder_and_upcast_attn": (not hf.get("reorder_and_upcast_attn", False), "false"),
        },
        hf,
        config_path,
    )
    whole_numbers(hf, ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"), config_path)
    return GPTConfig(
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


def llama_config(hf, config_path):
    whole_numbers(
        hf,
        ("vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads", "hidden_size"),
        config_path,
    )
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    settings = {**hf, "rope_theta": theta, "rope_type": rope.get("rope_type", "default")}
    refuse_unless(
        {
            "hidden_act": (hf.get("hidden_act", "silu") == "silu", "silu (SwiGLU)"),
            "rms_norm_eps": (hf.get("rms_norm_eps", 1e-6) == 1e-5, "1e-5"),
            "rope_theta": (theta == 10000.0, "10000"),
            "rope_type": (rope.get("rope_type", "default") == "default" and not hf.get("rope_scaling"), "default"),
            "head_dim": (hf.get("head_dim") in (None, hf["hidden_size"] // heads), "hidden_size / num_attention_heads"),
            "mlp_bias": (
                hf.get("mlp_bias", hf.get("attention_bias", False)) == hf.get("attention_bias", False),
                "the same as attention_bias",
            ),  # fmt: skip
            "use_sliding_window": (not hf.get("use_sliding_window", False), "false"),
        },
        settings,
        config_path,
    )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_embd=hf["hidden_size"],
        d_ff=hf.get("intermediate_size") or 0,
        dropout=hf.get("attention_dropout", 0.0),
        bias=bool(hf.get("attention_bias", False)),
        pos_encoding="rotary",
        activation="swiglu",
        norm="rmsnorm",
        n_kv_head=hf.get("num_key_value_heads") or heads,
        qk_norm=hf["model_type"] == "qwen3",
    )


def read_weights(folder):
    """The tensors of model.safetensors, or of a weights-only pytorch_model.bin, by name."""
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        return read_safetensors(safetensors_path)
    if os.path.isfile(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # refused pickles and damaged archives alike
            raise UserError(
                f"{bin_path} is not a readable weights-only checkpoint ({e.__class__.__name__}); "
                "use model.safetensors, or save the model again"
            ) from None
    raise UserError(f"{folder} has a config.json but no weights: put model.safetensors or pytorch_model.bin beside it")


def from_gpt2(hf_state, config):
    """model.py's state from GPT-2's tensors (its Conv1D matrices transposed back)."""
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (the original release) "h.0..."
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    state = {name: hf_state[name] for name in TOP_KEYS}
    for i in range(config.n_layer):
        for name, transpose in BLOCK_KEYS.items():
            tensor = hf_state[f"h.{i}.{name}"]
            state[f"blocks.{i}.{name}"] = tensor.t().contiguous() if transpose else tensor
    return state


def from_llama(hf_state, config):
    """model.py's state from Llama's or Qwen3's tensors: q, k, v joined into c_attn, gate and up into c_fc."""
    state = {"wte.weight": hf_state["model.embed_tokens.weight"], "ln_f.weight": hf_state["model.norm.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        state[ours + "ln_1.weight"] = hf_state[theirs + "input_layernorm.weight"]
        state[ours + "ln_2.weight"] = hf_state[theirs + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            attention = [hf_state[f"{theirs}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            state[ours + f"attn.c_attn.{kind}"] = torch.cat(attention)
            state[ours + f"attn.c_proj.{kind}"] = hf_state[f"{theirs}self_attn.o_proj.{kind}"]
            gate_up = [hf_state[f"{theirs}mlp.{p}_proj.{kind}"] for p in ("gate", "up")]
            state[ours + f"mlp.c_fc.{kind}"] = torch.cat(gate_up)
            state[ours + f"mlp.c_proj.{kind}"] = hf_state[f"{theirs}mlp.down_proj.{kind}"]
        if config.qk_norm:
            state[ours + "attn.q_norm.weight"] = hf_state[theirs + "self_attn.q_norm.weight"]
            state[ours + "attn.k_norm.weight"] = hf_state[theirs + "self_attn.k_norm.weight"]
    return state


def export_architecture(model_config):
    """
    ('gpt2', 'llama' or 'qwen3', None): the Hugging Face architecture a model.py config is,
    or (None, why not, with the switch to change). Learned positions make GPT-2 (GELU or ReLU,
    LayerNorm, a key and value per head); rotary positions make Llama (SwiGLU, RMSNorm, any
    grouped key/value heads), and with QK-norm Qwen3.
    """
    c, problems = model_config, []
    if c["pos_encoding"] == "learned":
        target = "gpt2"
        if c["activation"] not in ("gelu", "relu"):
            problems.append(f"activation is {c['activation']!r}; GPT-2 uses GELU: train with --activation=gelu")
        if c["norm"] != "layernorm":
            problems.append(f"norm is {c['norm']!r}; GPT-2 uses LayerNorm: train with --norm=layernorm")
        if c["n_kv_head"] != c["n_head"]:
            problems.append(
                f"n_kv_head is {c['n_kv_head']} (grouped-query attention); GPT-2 gives every head its keys and values: "
                "train with --n_kv_head=0 (or, for Llama, --pos_encoding=rotary)"
            )
        if c["qk_norm"]:
            problems.append(
                "qk_norm is on; GPT-2 does not normalise queries and keys: "
                "train with --qk_norm=False (or, for Qwen3, --pos_encoding=rotary)"
            )
    elif c["pos_encoding"] == "rotary":
        target = "qwen3" if c["qk_norm"] else "llama"
        if c["activation"] != "swiglu":
            problems.append(
                f"activation is {c['activation']!r}; with rotary positions that is Llama or Qwen3, which use SwiGLU: "
                "train with --activation=swiglu"
            )
        if c["norm"] != "rmsnorm":
            problems.append(f"norm is {c['norm']!r}; Llama and Qwen3 use RMSNorm: train with --norm=rmsnorm")
        if c["qk_norm"] and c["bias"]:
            problems.append("QK-norm makes it Qwen3, whose feed-forward has no biases: train with --bias=False")
    else:
        return None, (
            f"pos_encoding is {c['pos_encoding']!r}, which no standard architecture has: "
            "train with --pos_encoding=learned (GPT-2) or --pos_encoding=rotary (Llama, Qwen3)"
        )
    return (None, "; ".join(problems)) if problems else (target, None)


class Reads(dict):
    """A model's state that remembers which tensors a conversion read: the rest it would drop."""

    def __init__(self, state):
        super().__init__(state)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def to_hf(model_config, state, vocab_size, eot, eos):
    """
    (config.json dict, tensors by Hugging Face name) of a model.py checkpoint; vocab_size rows are kept. An output
    layer of its own (untied) goes out as lm_head.weight; a tensor the conversion has no place for is a ValueError
    naming it, never dropped.
    """
    architecture, problem = export_architecture(model_config)
    if problem:
        raise ValueError(problem)
    # tied: no output layer of its own, or one equal to the embedding (the same tensor, saved twice)
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["wte.weight"])
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    state = Reads(state)
    try:
        if architecture == "gpt2":
            config, tensors = gpt2_tensors(model_config, state, vocab_size)
        else:
            config, tensors = llama_tensors(model_config, state, vocab_size, qwen3=architecture == "qwen3")
    except KeyError as e:
        raise ValueError(
            f"model.py has no {e.args[0]}, which a {architecture} model needs (a renamed or removed module?)"
        ) from None
    if not tied:
        tensors["lm_head.weight"] = state["lm_head.weight"][:vocab_size].float().contiguous()
    left = sorted(set(state) - state.read - {"lm_head.weight"})
    if left:
        shown = ", ".join(f"{name} {shapes[name]}" for name in left[:3])
        raise ValueError(
            f"{shown}{', ...' if len(left) > 3 else ''} of model.py have no place in a {architecture} model "
            "(tensegpt/hf.py maps each tensor it knows; a buffer that need not be saved: persistent=False)"
        )
    config.update(bos_token_id=eot, eos_token_id=eos, tie_word_embeddings=tied, torch_dtype="float32")
    return config, tensors


@torch.no_grad()
def check_logits(model, hf_config, tensors, vocab_size):
    """
    None when transformers, loading the exported config and tensors, computes model's logits (on a probe of random
    tokens, to float32 rounding: 1e-3 of the largest logit); else what differs, in a line. model: in eval mode.
    """
    import transformers

    # torch_dtype: the spelling older transformers read, which newer ones warn about; float32 is the default
    settings = {key: value for key, value in hf_config.items() if key not in ("model_type", "torch_dtype")}
    config = transformers.AutoConfig.for_model(hf_config["model_type"], **settings)
    reference = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = reference.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if not (hf_config["tie_word_embeddings"] and name == "lm_head.weight")]
    if missing or unexpected:
        return f"transformers' {type(reference).__name__} expects {missing[:3]} and does not know {unexpected[:3]}"
    if hf_config["tie_word_embeddings"]:
        reference.tie_weights()
    T = min(24, model.config.block_size)
    idx = torch.randint(vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    ours = model(idx.to(device), logits_at=torch.arange(T, device=device))[0][:, :vocab_size].float().cpu()
    theirs = reference(idx).logits[0].float()
    gap, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
    if not gap <= 1e-3 * max(1.0, scale):
        return (
            f"transformers' {type(reference).__name__} computes other logits than model.py from these weights "
            f"(largest difference {gap:.3g}, logits up to {scale:.3g}): model.py computes something the "
            f"{hf_config['model_type']} architecture does not (an activation, a soft-cap, a norm?), "
            "or tensegpt/hf.py maps a tensor wrongly"
        )
    return None


def gpt2_tensors(model_config, state, vocab_size):
    """GPT2LMHeadModel's config and tensors: the same names, its matrices transposed (Conv1D)."""
    c = model_config
    tensors = {}
    for name in TOP_KEYS:
        if name in state:
            tensors[f"transformer.{name}"] = state[name]
        else:  # bias=False: a LayerNorm without bias is one with bias 0
            tensors[f"transformer.{name}"] = torch.zeros(c["n_embd"])
    # the model's padding rows (never a target) are left out: one row per token of the tokenizer
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
    }
    return config, tensors


LLAMA_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def llama_pieces(model_config, matrix, tensor):
    """
    One of a block's LLAMA_MATRICES (its weight, bias or LoRA B: rows are its outputs) as
    Llama's modules: c_attn's rows split into q, k and v, c_fc's into SwiGLU's gate and up.
    """
    c = model_config
    kv = c["n_kv_head"] * (c["n_embd"] // c["n_head"])
    if matrix == "attn.c_attn":
        return dict(
            zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), tensor.split([c["n_embd"], kv, kv]))
        )
    if matrix == "mlp.c_fc":
        return dict(zip(("mlp.gate_proj", "mlp.up_proj"), tensor.split([c["d_ff"], c["d_ff"]])))
    return {"self_attn.o_proj" if matrix == "attn.c_proj" else "mlp.down_proj": tensor}


def llama_tensors(model_config, state, vocab_size, qwen3=False):
    """
    LlamaForCausalLM's (or Qwen3ForCausalLM's) config and tensors. The conventions already
    agree: rotary positions turn the pairs (i, i + d/2) of each head at the angle
    p * 10000^(-2i/d) (Hugging Face's rotate_half layout), RMSNorm's epsilon is 1e-5, and
    grouped key/value heads serve consecutive query heads. c_attn splits into q, k, v; c_fc
    into SwiGLU's gate and up halves.
    """
    c = model_config
    tensors = {"model.embed_tokens.weight": state["wte.weight"][:vocab_size], "model.norm.weight": state["ln_f.weight"]}
    for i in range(c["n_layer"]):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        tensors[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        tensors[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if c["bias"] else ("weight",):
            for matrix in LLAMA_MATRICES:
                for name, piece in llama_pieces(c, matrix, state[f"{ours}{matrix}.{kind}"]).items():
                    tensors[f"{theirs}{name}.{kind}"] = piece
        if qwen3:
            tensors[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            tensors[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
    tensors = {name: tensor.float().contiguous() for name, tensor in tensors.items()}
    config = {
        "model_type": "qwen3" if qwen3 else "llama",
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": c["n_embd"],
        "intermediate_size": c["d_ff"],
        "num_hidden_layers": c["n_layer"],
        "num_attention_heads": c["n_head"],
        "num_key_value_heads": c["n_kv_head"],
        "head_dim": c["n_embd"] // c["n_head"],
        "max_position_embeddings": c["block_size"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        # both spellings: rope_parameters (transformers 5), rope_theta (earlier ones and the converters)
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": c["bias"],
        "attention_dropout": c["dropout"],
        "initializer_range": 0.02,
    }
    if qwen3:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c["n_layer"])
    else:
        config.update(mlp_bias=c["bias"], pretraining_tp=1)
    return config, tensors


def peft_adapter(model_config, adapters, lora_settings, vocab_size):
    """
    (adapter_config.json dict, tensors) of a PEFT LoRA folder for the base that to_hf wrote:
    each adapted matrix's A and B under Hugging Face's module names (c_attn's B split across
    q, k and v for Llama and Qwen3, which share its A; c_fc's across gate and up), and an
    adapted embedding, new rows included, as a module to save whole: once as the embedding and
    once as the output layer, which share it here and are separate modules in PEFT.
    """
    c = model_config
    architecture, _ = export_architecture(c)
    tensors, targets = {}, set()
    for name, pair in adapters.items():
        if name == "wte":
            continue
        A, B = pair
        # "blocks.3.attn.c_attn" -> layer 3, "attn.c_attn"
        _, i, matrix = name.split(".", 2)
        if architecture == "gpt2":
            pieces = {f"transformer.h.{i}.{matrix}": B}
        else:
            pieces = {f"model.layers.{i}.{module}": b for module, b in llama_pieces(c, matrix, B).items()}
        for module, b in pieces.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().clone()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()
            targets.add(module.rsplit(".", 1)[-1])
    saved = None
    if adapters["wte"] is not None:
        embedding = "transformer.wte" if architecture == "gpt2" else "model.embed_tokens"
        saved = [embedding.rsplit(".", 1)[-1], "lm_head"]
        weight = adapters["wte"][:vocab_size].float().contiguous()
        tensors[f"base_model.model.{embedding}.weight"] = weight
        tensors["base_model.model.lm_head.weight"] = weight.clone()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_settings["rank"],
        "lora_alpha": lora_settings["alpha"],
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        # GPT-2's matrices are Conv1D, (in, out)
        "fan_in_fan_out": architecture == "gpt2",
        "bias": "none",
        "modules_to_save": saved,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": None,
    }
    return config, tensors
