"""
A checkpoint as one GGUF file, the format llama.cpp reads (and ollama, LM Studio and
llamafile, which are built on it), written with the `gguf` package llama.cpp publishes for
its format (pip install gguf).

It starts from the Hugging Face export (tensegpt/hf.py), whose tensors transformers has
already shown to compute the checkpoint's logits, and renames them as llama.cpp's own
converter does, through gguf's table of names (TensorNameMap). Two layouts differ from
Hugging Face's:
- GPT-2: Hugging Face keeps the four matrices of a block as Conv1D (in, out); GGUF as
  nn.Linear (out, in), as model.py does.
- Llama: llama.cpp turns the pairs (2i, 2i + 1) of a head's query and key, Hugging Face the
  pairs (i, i + d/2); each head's rows are interleaved to match. Qwen3 turns the same pairs
  as Hugging Face (llama.cpp's "neox" rotation): nothing changes.

The tokenizer goes inside: GPT-2's byte-level BPE (or the compact vocabulary cut out of it)
as the tokens in id order under their printable spellings, the merges, which tokens are
control tokens (end-of-text, the chat tokens), the end-of-text as BOS, what ends an answer
as EOS, "gpt-2" as the pre-tokenizer llama.cpp splits text with, and a chat model's Jinja
template.
"""

import numpy as np
import torch

from tensegpt.common import UserError, atomic_write

# what --outtype names (the names of llama.cpp's converter) -> (tensor type, the file type it records)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# token types of llama.cpp's vocabulary
NORMAL, CONTROL = 1, 3


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("export.py --format=gguf writes with llama.cpp's gguf package: pip install gguf") from None
    return gguf


def gguf_problem(hf_config):
    """Why llama.cpp cannot compute an exportable model, with the fix, or None."""
    if hf_config["model_type"] == "gpt2" and hf_config["activation_function"] != "gelu_new":
        return "llama.cpp's GPT-2 uses GELU, not ReLU: train with --activation=gelu (or export --format=hf)"
    return None


def interleave_heads(weight, heads):
    """Rows of each head from the pairs (i, i + d/2) to the pairs (2i, 2i + 1): (heads * d, ...) -> the same shape."""
    d = weight.shape[0] // heads
    # (heads, 2, d/2, ...) -> (heads, d/2, 2, ...): row i of the first half, then row i of the second
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(gguf, hf_config, tensors):
    """{GGUF name: float32 tensor} of an export's Hugging Face tensors."""
    kind = hf_config["model_type"]
    architecture = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[kind]
    names = gguf.get_tensor_name_map(architecture, hf_config.get("n_layer") or hf_config["num_hidden_layers"])
    out = {}
    for name, tensor in tensors.items():
        if kind == "gpt2" and name.endswith(GPT2_CONV1D):
            tensor = tensor.t()
        if kind == "llama" and ".self_attn.q_proj." in name:
            tensor = interleave_heads(tensor, hf_config["num_attention_heads"])
        if kind == "llama" and ".self_attn.k_proj." in name:
            tensor = interleave_heads(tensor, hf_config["num_key_value_heads"])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"gguf has no name for {name} in a {kind} model")
        out[new] = tensor.float().contiguous()
    return out


def tokenizer_fields(tokenizer_json, tokenizer_config):
    """(tokens in id order, their types, merges as 'left right', the special tokens' ids)."""
    model = tokenizer_json["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    special = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    for text, i in special.items():
        if i == len(tokens):
            tokens.append(text)
        elif tokens[i] != text:
            raise ValueError(f"special token {text} is id {i}, which the vocabulary gives to {tokens[i]}")
    types = [CONTROL if text in special else NORMAL for text in tokens]
    merges = [" ".join(pair) for pair in model["merges"]]
    ids = {role: special[tokenizer_config[f"{role}_token"]] for role in ("bos", "eos", "pad")}
    return tokens, types, merges, ids


def quantized(gguf, tensor, tensor_type):
    """(data, type) of one tensor as the file holds it: norms, biases and rows Q8_0 cannot cut stay wider."""
    data = tensor.numpy()
    kind = gguf.GGMLQuantizationType[tensor_type]
    # 1-D tensors (norms, biases) are F32 in every file, as llama.cpp's converter writes them
    if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if data.shape[-1] % block:
        # Q8_0, Q5_0 and Q4_0 pack 32 numbers of a row at a time; a row of another length goes as F16, as the
        # converter does
        kind = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def write_gguf(path, hf_config, tensors, tokenizer_json, tokenizer_config, outtype, name):
    """The export as one GGUF file at path (written whole, then renamed into place); the tensor types, counted."""
    gguf = import_gguf()
    if tokenizer_json["pre_tokenizer"]["type"] != "ByteLevel":
        raise UserError(
            "cannot export to GGUF: llama.cpp splits text with the patterns it has names for, and a --split_pattern "
            "of your own has none: prepare with GPT-2's (leave out --split_pattern), or export --format=hf"
        )
    if problem := gguf_problem(hf_config):
        raise UserError(f"cannot export to GGUF: {problem}; nothing was written")
    tensor_type, file_type = OUTTYPES[outtype]
    named = gguf_tensors(gguf, hf_config, tensors)
    tokens, types, merges, ids = tokenizer_fields(tokenizer_json, tokenizer_config)
    c = hf_config
    gpt2 = c["model_type"] == "gpt2"
    counts = {}

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, c["model_type"])
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[file_type])
        writer.add_context_length(c["n_positions"] if gpt2 else c["max_position_embeddings"])
        writer.add_embedding_length(c["n_embd"] if gpt2 else c["hidden_size"])
        writer.add_block_count(c["n_layer"] if gpt2 else c["num_hidden_layers"])
        writer.add_feed_forward_length(c["n_inner"] if gpt2 else c["intermediate_size"])
        writer.add_head_count(c["n_head"] if gpt2 else c["num_attention_heads"])
        if gpt2:
            writer.add_head_count_kv(c["n_head"])
            writer.add_layer_norm_eps(c["layer_norm_epsilon"])
        else:
            writer.add_head_count_kv(c["num_key_value_heads"])
            writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
            writer.add_rope_freq_base(c["rope_theta"])
            writer.add_rope_dimension_count(c["head_dim"])
            writer.add_key_length(c["head_dim"])
            writer.add_value_length(c["head_dim"])
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(ids["bos"])
        writer.add_eos_token_id(ids["eos"])
        writer.add_pad_token_id(ids["pad"])
        # prompts start as sample.py starts them: with their own tokens (end-of-text only for an empty one)
        writer.add_add_bos_token(False)
        if "chat_template" in tokenizer_config:
            writer.add_eot_token_id(ids["eos"])
            writer.add_chat_template(tokenizer_config["chat_template"])
        for tensor_name, tensor in named.items():
            data, kind = quantized(gguf, tensor, tensor_type)
            counts[kind.name] = counts.get(kind.name, 0) + 1
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with torch.no_grad():
        atomic_write(path, write, by_name=True)
    return counts
