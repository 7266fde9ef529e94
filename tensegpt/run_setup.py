"""
What train.py checks and decides before its first step, in its two named steps:
start_run (its settings, the processes, device and dtype, the out_dir: an OS lock, and no
silent overwrite of a finished run) and starting_point (the model to start from: new,
GPT-2's weights, a checkpoint to fine-tune or the run to resume, and what a resume changes).
"""

import os
import sys
from dataclasses import MISSING, dataclass, fields, replace

import torch

from model import GPTConfig, check_config
from tensegpt import checkpoint, distributed, lora
from tensegpt.common import UserError, check_seed, check_writable_folder
from tensegpt.hardware import DTYPES, pick_dtype
from tensegpt.runlog import RunLog
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]
# the model keys that say how the model computes, not what: the run's own value, whatever the checkpoint's
HOW_KEYS = {"attention"}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # init_from: downloaded from the hub

# What each train.py key may do when a run resumes (--init_from=resume). Every key of
# train.py's DEFAULTS has a row (tests/test_faults.py walks them all, so a key added later
# without one fails the suite).
RESUME_FREE = {  # how the run is carried out or reported: the saved state serves any value
    "data_dir",
    "out_dir",
    "init_from",
    "overwrite",
    "eval_interval",
    "early_stop",
    "log_interval",
    "device",
    "dtype",
    *HOW_KEYS,
    "peak_flops",
    "compile",
    "grad_checkpointing",
    "fsdp",
}
RESUME_SCHEDULE = {
    "max_iters",
    "warmup_iters",
    "lr_decay_iters",
    "learning_rate",
    "min_lr",
}  # see schedule_note
RESUME_NOTED = {  # the run goes on differently from here: a line says what changed
    "batch_size": "each step now sees another number of tokens",
    "grad_accum": "each step now sees another number of tokens",
    "weight_decay": "the weights now decay at another rate",
    "grad_clip": "gradients are now clipped at another norm",
    "eval_iters": "val losses are now averaged over another number of batches, so they compare less "
    "exactly with the best one so far",
    "train_on_prompt": "the loss now counts other tokens of each conversation",
}
RESUME_MATCH = {  # the saved state is right only for the saved value
    "optimizer": "the saved optimizer state belongs to that optimizer",
    "beta1": "the saved moment estimates were averaged with that beta1",
    "beta2": "the saved moment estimates were averaged with that beta2",
    "seed": "the evaluation batches (and so the best val loss so far) were drawn with that seed",
    "chat": "the run trains on that kind of data",
    "lora_rank": "the saved adapters have that shape",
    "lora_alpha": "the saved adapters were trained with that scale",
    "lora_targets": "the saved adapters sit on those matrices",
    **{key: "the saved weights are that model's" for key in MODEL_KEYS if key not in HOW_KEYS},
}


def with_model_keys(defaults):
    """train.py's DEFAULTS with every GPTConfig field it does not list (a fork's new one), at GPTConfig's default."""
    # the declared defaults, not an instance's: __post_init__ fills some fields in (d_ff, n_kv_head)
    declared = {
        f.name: f.default if f.default is not MISSING else getattr(GPTConfig(), f.name) for f in fields(GPTConfig)
    }
    return {**defaults, **{key: declared[key] for key in MODEL_KEYS if key not in defaults}}


def check_train_config(config):
    positive = (
        "batch_size",
        "block_size",
        "grad_accum",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "log_interval",
    )
    for key in positive:
        if config[key] <= 0:
            raise UserError(f"config key {key} must be positive, got {config[key]}")
    for key in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "early_stop"):
        if config[key] < 0:
            raise UserError(f"config key {key} must not be negative, got {config[key]}")
    init = config["init_from"]
    if init not in ("scratch", "resume", *GPT2_NAMES) and not init.startswith("hf:") and not init.endswith(".pth"):
        raise UserError(
            f"init_from must be 'scratch', 'resume', 'hf:FOLDER', one of {', '.join(GPT2_NAMES)} "
            f"(GPT-2 from the Hugging Face hub) or a checkpoint FILE.pth to fine-tune; got {init!r}"
        )
    if config["optimizer"] not in ("adamw", "muon"):
        raise UserError(f"optimizer must be 'adamw' or 'muon', got {config['optimizer']!r}")
    if config["dtype"] not in DTYPES:
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {config['dtype']!r}")
    check_seed(config)
    # the model keys, before any work (the vocabulary is the data's: any size here)
    if problems := check_config(GPTConfig(vocab_size=64, **{key: config[key] for key in MODEL_KEYS})):
        raise UserError("; ".join(problems))
    if not config["data_dir"]:
        raise UserError("--data_dir is empty: pass the folder prepare.py wrote, --data_dir=DIR")
    check_writable_folder(config["out_dir"], "out_dir")


@dataclass
class Run:
    """Where and how this process trains, settled before any work."""

    rank: int  # 0 for one process; torchrun's rank otherwise
    local_rank: int
    world_size: int
    device: str
    dtype: str
    log: RunLog  # progress lines, metrics.jsonl and loss.png (rank 0 only)
    lock: object  # the out_dir's OS lock: held while the run lives
    best_path: str  # out_dir/trained.pth, the best val loss so far
    last_path: str  # out_dir/last.pth, the latest state


def start_run(config):
    """train.py's first step: its settings checked, the processes, device and dtype, the out_dir locked."""
    check_train_config(config)
    best_path, last_path = os.path.join(config["out_dir"], "trained.pth"), os.path.join(config["out_dir"], "last.pth")
    refuse_overwrite(config, [best_path, last_path])
    rank, local_rank, world_size, device = distributed.setup(config)  # one process: 0, 0, 1, the device
    log = RunLog(config, master=rank == 0)  # only rank 0 prints and writes files
    lock = lock_out_dir(config["out_dir"]) if rank == 0 else None
    dtype = pick_dtype(config["dtype"], device)
    check_layout(config, world_size, dtype)
    # dropout masks differ between ranks; rank 0's weights are everyone's
    torch.manual_seed(config["seed"] + rank)
    return Run(rank, local_rank, world_size, device, dtype, log, lock, best_path, last_path)


@dataclass
class Start:
    """The model a run starts from: starting_point's answer."""

    gpt_config: GPTConfig
    saved: dict | None  # the checkpoint to resume, or {"model": weights} to fine-tune; None: new weights
    base: str | None  # the trained model a fine-tuning run starts from (recorded in its checkpoints)
    lora_settings: dict | None  # LoRA's rank, alpha, targets; None: LoRA off
    notes: list  # resume: what this run changes, a line each


def starting_point(config, meta, tokenizer_meta, run, defaults, get_lr):
    """
    train.py's second step: the model to start from. Resume: the run's own last.pth (or
    trained.pth), refused if it cannot serve these settings; otherwise new, GPT-2's weights
    or a checkpoint to fine-tune (choose_model).
    """
    if config["init_from"] == "resume":
        path = run.last_path if os.path.exists(run.last_path) else run.best_path
        saved, changes = load_resumable(path, tokenizer_meta, meta, config, defaults)
        resuming = f"resuming {path} at iteration {saved['iter_num']} (best val loss {saved['best_val_loss']:.4f})"
        notes = [note for note in [resuming, *changes, schedule_note(saved, config, get_lr)] if note]
        gpt_config, base = checkpoint.gpt_config_of(saved, path), saved.get("base")
    else:
        (gpt_config, saved, base), notes = choose_model(config, meta, tokenizer_meta, run.log.say), []
    # how it computes is the run's to say (check_train_config checked the values)
    gpt_config = replace(gpt_config, **{key: config[key] for key in HOW_KEYS})
    return Start(gpt_config, saved, base, lora.check(config, gpt_config, saved), notes)


def refuse_overwrite(config, paths):
    existing = [p for p in paths if os.path.exists(p)]
    if config["init_from"] != "resume" and existing and not config["overwrite"]:
        args = " ".join(a for a in sys.argv[1:] if not a.startswith("--overwrite"))
        raise UserError(
            f"{existing[0]} already exists: to start over, run python train.py {args} --overwrite=True; "
            "to continue it, --init_from=resume; or pass another --out_dir"
        )


def lock_out_dir(out_dir):
    """
    Holds an OS lock on out_dir/.lock until this process ends, so a second train.py into
    the same folder refuses at once instead of interleaving checkpoints and logs. The OS
    drops the lock when a process dies, however it dies: a stale lock never blocks.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run one train.py per out_dir
        return None
    path = os.path.join(out_dir, ".lock")
    handle = open(path, "a+")  # held open for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise UserError(
            f"another train.py (process {holder}) is training into {out_dir}/ right now: "
            "wait for it to finish, or pass another --out_dir"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle  # the lock lives as long as this file object


def check_layout(config, world_size, dtype):
    """The combinations of --fsdp, --optimizer and dtype that cannot work, refused before any work."""
    if config["optimizer"] == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"--optimizer=muon needs torch.optim.Muon (torch 2.9 or later; this is {torch.__version__}): "
            "upgrade torch, or use --optimizer=adamw"
        )
    if not config["fsdp"]:
        return
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 9):  # 2.6 crashes on CPU; 2.7 and 2.8 sum the ranks' gradients instead of averaging
        raise UserError(
            f"--fsdp=True needs torch 2.9 or later (this is {torch.__version__}); upgrade torch, or train with DDP"
        )
    if world_size == 1:
        raise UserError(
            "--fsdp=True shards the model across the processes torchrun starts: "
            "run torchrun --nproc_per_node=N train.py ... (one process has nothing to share with)"
        )
    if config["optimizer"] == "muon":
        raise UserError(
            "--optimizer=muon orthogonalises whole matrices, which FSDP splits across processes: "
            "use --fsdp=False or --optimizer=adamw"
        )
    if dtype == "float16":
        raise UserError(
            "--fsdp=True trains in float32 or bfloat16 (float16 would need a sharded loss scaler): use --dtype=bfloat16"
        )


def padded_rows(vocab_size):
    """
    The embedding's and output layer's rows for vocab_size ids: a multiple of 64, for faster
    matmuls. The padding rows are never a target and decode to nothing.
    """
    return -(-vocab_size // 64) * 64


def gpt_config_for(config, vocab_size):
    """The GPTConfig of a train.py config's model keys, for a vocabulary of vocab_size ids."""
    return GPTConfig(vocab_size=padded_rows(vocab_size), **{k: config[k] for k in MODEL_KEYS})


def check_data_kind(config, meta):
    """Conversations are fine-tuned with --chat=True, and plain text is not: a one-line error otherwise."""
    data_dir = config["data_dir"]
    if config["chat"] and not meta.get("chat"):
        raise UserError(
            f"--chat=True trains on conversations, but {data_dir}/ holds plain text: "
            "prepare a .jsonl of conversations with prepare.py, or leave out --chat"
        )
    if meta.get("chat") and not config["chat"]:
        raise UserError(
            f"{data_dir}/ holds conversations (prepared from a .jsonl): "
            "fine-tune on them with --chat=True (config/chat.py), which counts the loss on the answers; "
            "or pass a plain-text --data_dir"
        )


def choose_model(config, meta, tokenizer_meta, say):
    """
    (GPTConfig, whole initial weights or None, the trained model it starts from or None): the
    config's model keys; GPT-2's weights (hf:FOLDER, or a name from the hub); or a
    checkpoint's (FILE.pth: fine-tuning, with a fresh optimizer and schedule).
    """
    init = config["init_from"]
    if init.startswith("hf:") or init in GPT2_NAMES:
        from tensegpt.hf import hub_folder

        folder = init[3:] if init.startswith("hf:") else hub_folder(init)
        model = load_gpt2_weights(folder, config, tokenizer_meta, say)
        return model.config, {"model": model.state_dict()}, init
    if init.endswith(".pth"):
        gpt_config, state, fresh_from = fine_tuning_start(init, config, meta, tokenizer_meta, say)
        return gpt_config, {"model": state, "fresh_from": fresh_from}, init
    # its model keys were checked before any work (check_train_config)
    return gpt_config_for(config, meta["vocab_size"]), None, None


def fine_tuning_start(path, config, meta, tokenizer_meta, say):
    """
    The GPTConfig and weights of a checkpoint to fine-tune on this data: the same tokens
    (the data was prepared with --vocab_from), plus rows for ids the checkpoint lacks (the
    chat tokens), each started as a copy of end-of-text's row: a boundary, as they are.
    """
    base = checkpoint.load(path, missing_hint="pass the trained.pth of the model to fine-tune")
    base_tokens = {k: v for k, v in base["tokenizer_meta"].items() if k != "chat_tokens"}
    if base_tokens != {k: v for k, v in tokenizer_meta.items() if k != "chat_tokens"}:
        raise UserError(
            f"{config['data_dir']}/ does not speak {path}'s tokens "
            f"({base['tokenizer_meta']['tokenizer']} vocabulary of another text): "
            f"prepare the data with --vocab_from={path}"
        )
    saved = checkpoint.gpt_config_of(base, path)
    block_size = config["block_size"]
    if saved.pos_encoding == "learned" and block_size > saved.block_size:
        raise UserError(f"{path} learned {saved.block_size} positions: use --block_size={saved.block_size} or less")
    rows = max(saved.vocab_size, padded_rows(meta["vocab_size"]))
    gpt_config = GPTConfig(
        **{**vars(saved), "vocab_size": rows, "block_size": block_size, "dropout": config["dropout"]}
    )
    state = dict(checkpoint.build_model(base, path).state_dict())  # LoRA adapters merged in
    eot = tokenizer_from_meta(tokenizer_meta).eot
    new_ids = range(tokenizer_from_meta(base["tokenizer_meta"]).vocab_size, meta["vocab_size"])
    tied = torch.equal(state["wte.weight"], state["lm_head.weight"])
    for name in ("wte.weight",) if tied else ("wte.weight", "lm_head.weight"):
        old = state[name]
        state[name] = torch.cat([old, old.new_zeros(rows - len(old), old.size(1))])  # more rows, if the ids need them
        state[name][list(new_ids)] = old[eot]
    if tied:
        state["lm_head.weight"] = state["wte.weight"]
    if "wpe.weight" in state:
        state["wpe.weight"] = state["wpe.weight"][:block_size]
    say(
        f"fine-tuning {path} (n_layer {saved.n_layer}, n_head {saved.n_head}, n_embd {saved.n_embd}; "
        f"the config's model keys are not used), {len(new_ids)} new token(s) started as end-of-text"
    )
    return gpt_config, state, new_ids.start


def load_gpt2_weights(folder, config, tokenizer_meta, say):
    """A GPT with the weights of a Hugging Face folder (GPT-2, Llama, Qwen3), cut to --block_size, to fine-tune."""
    from tensegpt.hf import load_hf
    from tensegpt.hf_tokenizer import meta_from_folder

    theirs = meta_from_folder(folder)
    if {k: v for k, v in theirs.items() if k != "chat_tokens"} != {
        k: v for k, v in tokenizer_meta.items() if k != "chat_tokens"
    }:
        if theirs["tokenizer"] == "gpt2":
            fix = "prepare it with --full_vocab=True"
        else:
            fix = f"prepare it with --vocab_from={folder}"
        raise UserError(
            f"the weights in {folder} read {theirs['tokenizer']} ids, but {config['data_dir']}/ is "
            f"{tokenizer_meta['tokenizer']} of another vocabulary: {fix}"
        )
    # the architecture is the checkpoint's; the context can shrink (fewer learned positions)
    model = load_hf(folder, block_size=config["block_size"], dropout=config["dropout"])
    c = model.config
    say(
        f"initialising from the weights in {folder} (n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}; "
        "the model keys of the config are not used)"
    )
    return model


def load_resumable(path, tokenizer_meta, meta, config, defaults):
    """
    (the checkpoint to continue, the lines to say about what this run changes). Refused,
    before any work, where the saved state cannot serve this run's settings.
    """
    saved = checkpoint.load(
        path,
        missing_hint="nothing to resume; leave out --init_from=resume to start a new run, "
        "or pass the --out_dir of the run to continue",
    )
    checkpoint.check_resumable(saved, path, tokenizer_meta, meta, config)
    return saved, resume_changes(saved, path, config, defaults)


def resume_changes(saved, path, config, defaults):
    """
    The notes for changed RESUME_NOTED keys (RESUME_SCHEDULE's: schedule_note), or a
    UserError that names every changed RESUME_MATCH key with both values.
    """
    # a key the checkpoint lacks was added since it was written: the run had its default
    then, now = {**defaults, **saved.get("train_config", {})}, config
    changed = [key for key in RESUME_MATCH if then[key] != now[key]]
    if changed:
        was = " ".join(f"--{key}={then[key]!r}" for key in changed)
        asks = " ".join(f"--{key}={now[key]!r}" for key in changed)
        why = "; ".join(dict.fromkeys(RESUME_MATCH[key] for key in changed))  # each reason once
        raise UserError(
            f"{path} was trained with {was} and this run asks for {asks}: {why}; "
            f"resume with {was}, or start a new run from scratch "
            "(leave out --init_from=resume and pass another --out_dir, or --overwrite=True)"
        )
    return [
        f"note: --{key} was {then[key]!r} and is now {now[key]!r}: {why}"
        for key, why in RESUME_NOTED.items()
        if then[key] != now[key]
    ]


def schedule_note(saved, config, get_lr):
    """A line about the learning rate when a resume changes where the schedule ends, else None."""
    before = {**config, **{k: v for k, v in saved.get("train_config", {}).items() if k in RESUME_SCHEDULE}}
    end = lambda c: c["lr_decay_iters"] or c["max_iters"]
    it = saved["iter_num"]
    if end(before) == end(config) and get_lr(it, before) == get_lr(it, config):
        return None
    return (
        f"note: the learning-rate schedule now decays until iteration {end(config)} (it was {end(before)}): "
        f"at iteration {it} the rate goes from {get_lr(it, before):.2e} to {get_lr(it, config):.2e}, "
        "so the loss may rise for a while before it falls again. "
        f"To keep the old schedule, pass --lr_decay_iters={end(before)} (the rate then stays at min_lr)"
    )
