"""
What sample.py needs beneath its story: its options checked, the model loaded (a
checkpoint, or Hugging Face GPT-2 weights), a prompt read from a file, the attention
picture drawn, and the /commands of the interactive loop.
"""

import glob
import os
import sys
from dataclasses import replace

import torch

from tensegpt.checkpoint import load_model
from tensegpt.common import UserError, check_output_file, pyplot, save_figure
from tensegpt.decode_weights import PRECISIONS, for_decoding
from tensegpt.model_check import check_model
from tensegpt.sequence import Sampling, SettingError
from tensegpt.sequence import check_sampling as check_sampling_rules

HELP = """commands: /temperature X  /top_k N (0 = off)  /top_p X  /greedy (on/off)  /max_new_tokens N
          /num_samples N  /repetition_penalty X  /seed N  /settings  /help  /quit (or Ctrl-D)"""


def sampling_of(config, temperature=None):
    """sample.py's options as serve.py's requests give them: the engine's Sampling (--greedy is temperature 0)."""
    temperature = config["temperature"] if temperature is None else temperature
    given = {key: config[key] for key in ("top_k", "top_p", "seed", "repetition_penalty")}
    return Sampling(temperature=0.0 if config["greedy"] else temperature, **given)


def check_sampling(config):
    """The sampling settings, checked by serve.py's rules (also after each change in the interactive loop)."""
    try:
        # the temperature as given, also while --greedy leaves it unused
        check_sampling_rules(replace(sampling_of(config), temperature=config["temperature"]))
    except SettingError as e:
        raise UserError(f"--{e}") from None
    for key in ("num_samples", "max_new_tokens"):
        if config[key] < 1:
            raise UserError(f"--{key} must be at least 1 (got {config[key]})")


def check_options(config):
    """Every option of sample.py, before any work; returns --temperatures as a list of floats (or None)."""
    check_sampling(config)
    if config["beam"] < 0:
        raise UserError(f"--beam must be >= 1 beams, or 0 to sample (got {config['beam']})")
    if config["length_penalty"] < 0:
        raise UserError(f"--length_penalty must be 0 or more (got {config['length_penalty']})")
    temps = config["temperatures"]
    if temps is not None:
        temps = temps if isinstance(temps, (tuple, list)) else (temps,)
        if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in temps):
            raise UserError(
                f"--temperatures must be numbers separated by commas, like 0.2,0.8,1.2 (got {config['temperatures']!r})"
            )
        temps = [float(t) for t in temps]
        for t in temps:
            try:
                check_sampling_rules(sampling_of(config, t))
            except SettingError as e:
                raise UserError(f"--temperatures: {e}") from None
    if config["score"] is not None:
        config["score"] = str(config["score"])  # --score=1984 is the text "1984"
        if not config["score"].strip():
            raise UserError('--score is empty: give the text to score, like --score="The baby is sleeping."')
    modes = [
        f"--{key}"
        for key in ("interactive", "chat", "score", "beam", "temperatures")
        if config[key] not in (False, None, 0)
    ]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are different modes: use one at a time")
    for key in ("precision", "draft_precision"):
        if config[key] not in PRECISIONS:
            raise UserError(f"--{key} must be one of {', '.join(PRECISIONS)} (got {config[key]!r})")
    if config["draft"]:
        if not isinstance(config["draft_tokens"], int) or config["draft_tokens"] < 1:
            raise UserError(f"--draft_tokens must be a whole number >= 1 (got {config['draft_tokens']!r})")
        other = [m for m in ("--score", "--beam") if m in modes]
        if other:
            raise UserError(f"--draft speeds up sampling; it does not combine with {other[0]}")
        if config["repetition_penalty"] != 1.0:
            raise UserError(
                "--draft keeps the model's own distribution, which --repetition_penalty changes: use one of them"
            )
    if config["attention"]:
        if modes:
            raise UserError(f"--attention draws the attention of the first sample; it does not combine with {modes[0]}")
        plt = pyplot()
        if plt is None:
            raise UserError("--attention needs matplotlib: pip install matplotlib")
        check_output_file(config["attention"], "attention", set(plt.figure().canvas.get_supported_filetypes()))
        plt.close("all")
    return temps


def load_sampling_model(config, device):
    """(model, tokenizer) from --ckpt, or from a Hugging Face folder (GPT-2, Llama, Qwen3): --init_from=hf:FOLDER."""
    if not config["init_from"]:
        ckpt = config["ckpt"]
        if not os.path.isfile(ckpt):
            found = sorted(glob.glob(os.path.join("*", "trained.pth")))
            hint = (
                f"found {', '.join(found)}: pass --ckpt={found[0]}"
                if found
                else "train one first with python train.py config/small.py (or pass --ckpt=PATH)"
            )
            raise UserError(f"no checkpoint at {ckpt}: {hint}")
        return load_model(ckpt, device)[:2]
    if not config["init_from"].startswith("hf:"):
        raise UserError(f"--init_from must be hf:FOLDER (a Hugging Face folder), got {config['init_from']!r}")
    from tensegpt.hf import load_hf
    from tensegpt.hf_tokenizer import meta_from_folder
    from tensegpt.tokenizer import from_meta

    folder = config["init_from"][3:]
    model = load_hf(folder).to(device).eval()
    check_model(model)
    return model, from_meta(meta_from_folder(folder))


def load_draft(config, tokenizer, device):
    """--draft: the draft model of speculative decoding (None without it), on the model's own tokens."""
    if not config["draft"]:
        return None
    if not os.path.isfile(config["draft"]):
        raise UserError(f"no draft checkpoint at {config['draft']} (from --draft)")
    draft, draft_tokenizer = load_model(config["draft"], device)[:2]
    if draft_tokenizer.meta() != tokenizer.meta():
        raise UserError(
            f"the draft {config['draft']} was trained on other tokens than the model: "
            "speculative decoding compares token ids, so train the draft on the same data folder"
        )
    return for_decoding(draft, config["draft_precision"])


def report_drafts(stats):
    """After speculative decoding, on stderr: how many drafted tokens were kept."""
    if stats.get("proposed"):
        print(
            f"speculative decoding: the model kept {stats['accepted']} of the draft's {stats['proposed']} tokens "
            f"({100 * stats['accepted'] / stats['proposed']:.0f}%), "
            f"{(stats['accepted'] + stats['passes']) / stats['passes']:.2f} tokens per pass of the model",
            file=sys.stderr,
        )


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:") :]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} does not exist (from --start=FILE:{path})")
        with open(path, encoding="utf-8", errors="replace") as f:
            # the file's last line break (echo and editors add one) is not part of the prompt
            return f.read().removesuffix("\n").removesuffix("\r")
    return start


@torch.no_grad()
def attention_weights(model, idx):
    """
    Each layer's attention weights for idx (1, T): [(n_head, T, T)]. Read by a forward hook on each layer's
    attn_dropout, which the written-out attention (attention='explicit') hands its weights to; a model that computes
    attention fused is copied into one that writes it out, with the same weights.
    """
    if model.config.attention != "explicit":
        explicit = type(model)(replace(model.config, attention="explicit")).to(idx.device).eval()
        explicit.load_state_dict(model.state_dict())
        model = explicit
    maps = []
    hooks = [
        block.attn.attn_dropout.register_forward_hook(lambda module, args, out: maps.append(args[0][0]))
        for block in model.blocks
    ]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    if len(maps) != len(model.blocks):
        raise UserError(
            f"--attention: {len(maps)} of {len(model.blocks)} layers handed their weights to attn_dropout; "
            "model.py's explicit attention must pass its softmax through attn_dropout to be drawn"
        )
    return maps


def token_label(tokenizer, token):
    """A token as a heatmap label: what a font cannot draw (a newline, a control byte) as its escape."""
    if token == tokenizer.eot:
        return "<end>"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in tokenizer.decode([token]))


def plot_attention(maps, labels, path):
    plt = pyplot()  # there: check_options checked
    n_layer, n_head = len(maps), maps[0].size(0)
    size = max(2.5, 0.25 * len(labels))
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), squeeze=False)
    for layer, heads in enumerate(maps):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(heads[head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.suptitle("attention: row = query token, column = key token it attends to")
    fig.tight_layout()
    save_figure(fig, path)


class Printer:
    """Prints a text as it grows, the new part each time (a token that ends inside a character waits)."""

    def __init__(self):
        self.shown = ""

    def __call__(self, text):
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text

    def finish(self, text):
        print(text[len(self.shown) :] if text.startswith(self.shown) else "", flush=True)


def check_chat_model(tokenizer, ckpt):
    """--chat needs a model fine-tuned with the chat template: a one-line error for any other."""
    if not hasattr(tokenizer, "end"):
        raise UserError(
            f"{ckpt} has no chat tokens: it continues text, it was not fine-tuned to answer. "
            "Fine-tune it with python train.py config/chat.py (docs/chat.md), or leave out --chat"
        )


def fit_history(tokenizer, messages, room):
    """The conversation's latest turns whose prompt fits in room tokens: the oldest dropped whole."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    while len(rest) > 1 and len(tokenizer.prompt(system + rest)) > room:
        rest = rest[2:] if rest[0]["role"] == "user" and len(rest) > 2 else rest[1:]  # a question and its answer
    return system + rest


def run_command(sampler, line):
    """One /command of the interactive loop (see HELP); False when it says to leave."""
    c = sampler.config
    command, _, value = line[1:].strip().partition(" ")
    if command in ("quit", "exit", "q"):
        return False
    if command == "help":
        print(HELP)
    elif command == "settings":
        print(
            ", ".join(
                f"{k}={c[k]}"
                for k in (
                    "temperature",
                    "top_k",
                    "top_p",
                    "greedy",
                    "max_new_tokens",
                    "num_samples",
                    "repetition_penalty",
                    "seed",
                )
            )
        )
    elif command == "greedy":
        c["greedy"] = not c["greedy"] if not value else value.lower() in ("on", "true", "1")
        print(f"greedy is {'on' if c['greedy'] else 'off'}")
    elif command in (
        "temperature",
        "top_k",
        "top_p",
        "max_new_tokens",
        "num_samples",
        "repetition_penalty",
        "seed",
    ):
        before = dict(c)
        try:
            number = float(value) if command in ("temperature", "top_p", "repetition_penalty") else int(value)
            c[command] = None if command == "top_k" and number == 0 else number
            check_sampling(c)
        except (ValueError, UserError) as e:
            c.update(before)
            print(f"error: {e if isinstance(e, UserError) else f'/{command} wants a number, got {value!r}'}")
            return True
        if command == "seed":
            sampler.generator.manual_seed(c["seed"])
        print(f"{command} = {c[command]}")
        if command == "repetition_penalty" and sampler.draft is not None and c[command] != 1.0:
            print("note: a repetition penalty changes the model's distribution, which the draft keeps: "
                  "the model samples alone until /repetition_penalty 1")  # fmt: skip
    else:
        print(f"unknown command /{command}; /help lists them")
    return True
