"""
The one owner of a checkpoint (trained.pth, last.pth): what it holds, how it is written
(atomically: an old file is never left half-replaced) and read (weights only: no pickled
code ever runs), and how a model is built back from it.

    model           the GPT's state dict
    model_config    the GPTConfig, as a dict
    tokenizer_meta  the tokenizer's part of meta.json: all that decoding needs
    data            what the run remembers of its data folder (DATA_KEYS of meta.json)
    train_config, iter_num, best_val_loss, optimizer, rng: train.py's, to resume exactly
    lora            LoRA fine-tuning only: {rank, alpha, targets, base}. The model's state dict
                    then holds the whole model (the frozen base weights and the adapters), so
                    the file stands alone: it loads without the base checkpoint it started
                    from (which may since have moved or been retrained); base names that
                    checkpoint and its sha256, to say where it came from.

The optimizer state is keyed by parameter name (torch.distributed.checkpoint's layout),
so a checkpoint written by one process, by DDP or by FSDP resumes under any of them.
"""

import os
import pickle
import re
import zipfile
from dataclasses import asdict

import torch

from model import GPT, GPTConfig
from tensegpt import lora
from tensegpt.common import UserError, atomic_write
from tensegpt.model_check import check_model
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

# the meta.json fields that make a data folder what it is (the token counts follow from them)
DATA_KEYS = [
    "source_sha256",
    "tokenizer",
    "vocab_size",
    "example",
    "split",
    "seed",
    "val_fraction",
    "train_tokens",
    "val_tokens",
]
RESUME_KEYS = ["optimizer", "iter_num", "best_val_loss", "rng"]


def data_record(meta):
    """What a checkpoint remembers of its data, so that resume can refuse data prepared differently."""
    return {key: meta.get(key) for key in DATA_KEYS}


def run_record(gpt_config, config, tokenizer_meta, meta, base, lora_settings):
    """What each checkpoint of a run holds beside its weights: the settings, the tokenizer, the data, the start."""
    return {
        "model_config": asdict(gpt_config),
        "train_config": config,
        "tokenizer_meta": tokenizer_meta,
        "data": data_record(meta),
        # the trained model this run started from (fine-tuning), or None
        "base": base,
        **({"lora": {**lora_settings, "base": base}} if lora_settings else {}),
    }


def save(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load(
    path,
    map_location="cpu",
    missing_hint="train one first with python train.py config/small.py (or pass --ckpt=PATH)",
):
    """A checkpoint of this project as a dict, or a UserError that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: {missing_hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(
            f"{path} is not a checkpoint (not a torch.save archive, or truncated): "
            "pass the trained.pth that train.py wrote"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any class or function: name the one that was found
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"{path} holds objects other than tensors and plain values{what}, refused for safety: "
            "only load checkpoints you trust"
        ) from None
    except Exception as e:  # a damaged archive fails in many ways
        raise UserError(
            f"{path} is not a readable checkpoint (damaged or truncated: {e.__class__.__name__}); "
            "train again or restore it"
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("tokenizer"), dict):
        checkpoint["tokenizer_meta"] = checkpoint.pop("tokenizer")  # written before the key had its own name
    if not isinstance(checkpoint, dict) or not {"model", "model_config", "tokenizer_meta"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project (it lacks model, model_config or tokenizer_meta)")
    return checkpoint


def cannot_load(path, e):
    return UserError(
        f"{path} is not a checkpoint this version of the project can load ({e.__class__.__name__}: "
        f"{str(e).splitlines()[0][:160]})"
    )


def gpt_config_of(checkpoint, path):
    """The checkpoint's GPTConfig; keys added to GPTConfig since it was written take their defaults."""
    try:
        return GPTConfig(**checkpoint["model_config"])
    except TypeError as e:  # a key this version does not know
        raise cannot_load(path, e) from None


def build_model(checkpoint, path, merge=True):
    """The GPT a checkpoint describes, with its weights (LoRA adapters merged in, or kept apart), or a UserError."""
    try:
        model = GPT(gpt_config_of(checkpoint, path))
        if checkpoint.get("lora"):
            lora.add_adapters(model, checkpoint["lora"])
        check_fits(model, checkpoint["model"], path)
        model.load_state_dict(checkpoint["model"])
        if checkpoint.get("lora") and merge:
            lora.merge(model)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise cannot_load(path, e) from None
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise UserError(
            f"{path} holds NaN or infinite weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): "
            "it cannot generate; use a checkpoint from before training diverged"
        )
    return model


def check_fits(model, state, path):
    """A UserError naming the tensors where a checkpoint and model.py's GPT (a fork's, say) disagree."""
    ours = model.state_dict()
    lacks = [name for name in ours if name not in state]
    extra = [name for name in state if name not in ours]
    shapes = [name for name in ours if name in state and ours[name].shape != state[name].shape]
    problems = []
    if lacks:
        problems.append(f"it lacks {', '.join(lacks[:3])}{', ...' if len(lacks) > 3 else ''}, which model.py has")
    if extra:
        problems.append(f"it holds {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}, which model.py has not")
    for name in shapes[:2]:
        problems.append(f"its {name} is {tuple(state[name].shape)}, model.py's {tuple(ours[name].shape)}")
    if problems:
        raise UserError(
            f"{path} does not fit this model.py: {'; '.join(problems)} (was model.py edited after training? "
            "train again, or undo the edit)"
        )


def load_model(path, device="cpu"):
    """(model in eval mode on device, tokenizer, checkpoint) from a trained.pth."""
    checkpoint = load(path, map_location=device)
    model = build_model(checkpoint, path).to(device).eval()
    # the cached and batched ways of running it give the plain forward's logits (a fork's attention may not)
    check_model(model)
    try:
        tokenizer = tokenizer_from_meta(checkpoint["tokenizer_meta"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(
            f"{path} names a tokenizer this version cannot rebuild ({e.__class__.__name__}: {e}); train again"
        ) from None
    return model, tokenizer, checkpoint


def optimizer_state_by_name(state, model):
    """
    An optimizer state dict keyed by parameter name. Checkpoints written before names were
    used number the parameters instead, in the order of the AdamW groups of that time
    (matrices, then vectors); this translates them.
    """
    params = [p for group in state["param_groups"] for p in group["params"]]
    if all(isinstance(p, str) for p in params):
        return state
    named = list(model.named_parameters())
    names = [name for name, p in named if p.dim() >= 2] + [name for name, p in named if p.dim() < 2]
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def check_resumable(checkpoint, path, tokenizer_meta, meta, config):
    """Refuses, with what differs, a checkpoint that is not a run on this data (settings: run_setup.py)."""
    missing = set(RESUME_KEYS) - checkpoint.keys()
    if missing:
        raise UserError(f"{path} cannot be resumed: it lacks {', '.join(sorted(missing))} (not written by train.py?)")
    then, now = checkpoint.get("data"), data_record(meta)
    if then is not None and then != now:
        diff = [f"{k} {then.get(k)!r} then, {now[k]!r} now" for k in DATA_KEYS if then.get(k) != now[k]]
        raise UserError(
            f"{path} was trained on data prepared differently from {config['data_dir']}/ ({'; '.join(diff)}): "
            "resuming would train on lines it was validated on, or on other text; "
            "prepare the data as before, or start a new --out_dir"
        )
    if checkpoint["tokenizer_meta"] != tokenizer_meta:
        raise UserError(
            f"{path} was trained on data with another tokenizer than {config['data_dir']}/: "
            "prepare the same data again or use another --out_dir"
        )
    if checkpoint["iter_num"] >= config["max_iters"]:
        raise UserError(
            f"{path} is already at iteration {checkpoint['iter_num']} >= max_iters {config['max_iters']}: "
            "pass a larger --max_iters to train on"
        )
