"""
Generates text from a trained model.

    python sample.py --start="The baby is"
    python sample.py --start=FILE:prompt.txt --num_samples=5 --temperature=0.6 --top_k=20
    python sample.py --start="She has" --greedy
    python sample.py --start="The baby is" --temperatures=0.2,0.8,1.2   # one prompt, several temperatures
    python sample.py --start="The baby is" --beam=5                    # most likely continuation found
    python sample.py --score="The baby will sleep."                    # log-probability of a given text
    python sample.py --start="The baby is" --attention=attn.png        # attention heatmaps
    python sample.py --interactive                                     # a prompt loop

The prompt is encoded with the tokenizer recorded in the checkpoint. Each sample stops
at the end-of-text token (the end of a sentence, for tense.txt) or after max_new_tokens.
An empty --start (the default) starts from the end-of-text token: the model begins a
new sentence of its own. A prompt longer than the model's context keeps its last
block_size tokens (a note says so on stderr). The same --seed gives the same text.
"""
import glob
import math
import os
import sys

import torch

from checkpoint import load_model
from common import (UserError, check_output_file, check_seed, main_guard, parse_config, pick_device, pyplot,
                    save_figure)

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to sample from
    "init_from": "",  # hf:FOLDER samples from Hugging Face GPT-2 weights instead of --ckpt
    "start": "",  # the prompt; FILE:path reads it from a file; empty starts a new sentence
    "num_samples": 3,  # how many continuations
    "max_new_tokens": 100,  # the most tokens per continuation
    "temperature": 0.8,  # < 1 sharper, > 1 flatter
    "top_k": None,  # keep only the k most likely tokens
    "top_p": 1.0,  # keep the smallest set of likely tokens whose probability reaches top_p
    "greedy": False,  # always the most likely token (temperature, top_k, top_p unused)
    "repetition_penalty": 1.0,  # > 1 makes tokens already in the text less likely
    "seed": 1337,  # the same seed gives the same text (0 to 2**32 - 1)
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    "stream": None,  # print tokens as they come; None: when writing to a terminal
    "temperatures": None,  # e.g. 0.2,0.8,1.2: the same prompt at each temperature, side by side
    "beam": 0,  # > 0: beam search with this many beams instead of sampling
    "length_penalty": 1.0,  # beam search ranks by log-probability / length**length_penalty
    "score": None,  # a text to score: per-token log-probabilities and perplexity
    "attention": "",  # a PNG path: heatmaps of every layer's and head's attention (needs matplotlib)
    "interactive": False,  # a prompt loop on standard input; /help lists its commands
}
HELP = """commands: /temperature X  /top_k N (0 = off)  /top_p X  /greedy (on/off)  /max_new_tokens N
          /num_samples N  /repetition_penalty X  /seed N  /settings  /help  /quit (or Ctrl-D)"""


def check_sampling(config):
    """The sampling settings, checked (also after each change in the interactive loop); changes nothing."""
    if not config["greedy"] and config["temperature"] <= 0:
        raise UserError(f"--temperature must be > 0 (got {config['temperature']}); for the most likely token use --greedy")
    if config["top_k"] is not None and (not isinstance(config["top_k"], int) or isinstance(config["top_k"], bool) or config["top_k"] < 1):
        raise UserError(f"--top_k must be a whole number >= 1 (got {config['top_k']!r}); leave it out to keep every token")
    if not 0.0 < config["top_p"] <= 1.0:
        raise UserError(f"--top_p must be in (0, 1] (got {config['top_p']}); 1.0 keeps every token")
    for key in ("num_samples", "max_new_tokens"):
        if config[key] < 1:
            raise UserError(f"--{key} must be at least 1 (got {config[key]})")
    if config["repetition_penalty"] <= 0:
        raise UserError(f"--repetition_penalty must be > 0 (got {config['repetition_penalty']}); 1.0 turns it off")
    check_seed(config)


def check_options(config):
    """Every option of this script, before any work; returns the --temperatures as a list of floats (or None)."""
    check_sampling(config)
    if config["beam"] < 0:
        raise UserError(f"--beam must be >= 1 beams, or 0 to sample (got {config['beam']})")
    if config["length_penalty"] < 0:
        raise UserError(f"--length_penalty must be 0 or more (got {config['length_penalty']})")
    temps = config["temperatures"]
    if temps is not None:
        temps = temps if isinstance(temps, (tuple, list)) else (temps,)
        if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps):
            raise UserError(f"--temperatures must be numbers > 0 separated by commas, like 0.2,0.8,1.2 (got {config['temperatures']!r})")
        temps = [float(t) for t in temps]
    if config["score"] is not None:
        config["score"] = str(config["score"])  # --score=1984 is the text "1984"
        if not config["score"].strip():
            raise UserError('--score is empty: give the text to score, like --score="The baby is sleeping."')
    modes = [f"--{key}" for key in ("interactive", "score", "beam", "temperatures") if config[key] not in (False, None, 0)]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are different modes: use one at a time")
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
    """(model, tokenizer) from --ckpt, or from a Hugging Face GPT-2 folder with --init_from=hf:FOLDER."""
    if not config["init_from"]:
        ckpt = config["ckpt"]
        if not os.path.isfile(ckpt):
            found = sorted(glob.glob(os.path.join("*", "trained.pth")))
            hint = (f"found {', '.join(found)}: pass --ckpt={found[0]}" if found else
                    "train one first with python train.py config/small.py (or pass --ckpt=PATH)")
            raise UserError(f"no checkpoint at {ckpt}: {hint}")
        return load_model(ckpt, device)[:2]
    if not config["init_from"].startswith("hf:"):
        raise UserError(f"--init_from must be hf:FOLDER (a Hugging Face GPT-2 folder), got {config['init_from']!r}")
    from hf import load_hf
    from tokenizer import GPT2

    return load_hf(config["init_from"][3:]).to(device).eval(), GPT2()


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} does not exist (from --start=FILE:{path})")
        with open(path, encoding="utf-8", errors="replace") as f:
            # the file's last line break (echo and editors add one) is not part of the prompt
            return f.read().removesuffix("\n").removesuffix("\r")
    return start


class Sampler:
    """A model, its tokenizer and the settings: turns prompts into text."""

    def __init__(self, model, tokenizer, config, device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.generator = torch.Generator(device=device).manual_seed(config["seed"])

    def prompt_ids(self, prompt):
        unknown = self.tokenizer.unknown(prompt)
        if unknown:
            what = "characters" if self.tokenizer.name == "char" else "words"
            effect = "dropped" if self.tokenizer.name == "char" else "read as <unk>"
            print(f"note: {len(unknown)} {what} of the prompt are not in the vocabulary, {effect}: "
                  f"{' '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}", file=sys.stderr)
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot]
        block_size = self.model.config.block_size
        if len(ids) > block_size:
            print(f"note: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
                  f"keeping its last {block_size}", file=sys.stderr)
            ids = ids[-block_size:]
        return ids

    def text(self, prompt_ids, new_ids):
        """The prompt and the new tokens up to end-of-text, as text."""
        eot = self.tokenizer.eot
        if eot in new_ids:
            new_ids = new_ids[: new_ids.index(eot)]
        return self.tokenizer.decode([t for t in prompt_ids if t != eot] + list(new_ids))

    def sample(self, prompt_ids, temperature=None, stream=False):
        """One continuation of prompt_ids, printed piece by piece if stream; returns its text."""
        c = self.config
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        steps = self.model.generate_stream(
            idx, c["max_new_tokens"], temperature=temperature or c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
            greedy=c["greedy"], stop_token=self.tokenizer.eot, generator=self.generator,
            repetition_penalty=c["repetition_penalty"],
        )
        new, shown = [], ""
        for step in steps:
            new.append(step.item())
            if stream:
                text = self.text(prompt_ids, new)
                # a token can end inside a multi-byte character: wait for the rest of it
                if not text.endswith("\ufffd") and text.startswith(shown):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        text = self.text(prompt_ids, new)
        if stream:
            print(text[len(shown):] if text.startswith(shown) else "", flush=True)
        return text

    def beam(self, prompt_ids):
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        new, logprob = self.model.beam_search(idx, self.config["beam"], self.config["max_new_tokens"],
                                              stop_token=self.tokenizer.eot, length_penalty=self.config["length_penalty"])
        return self.text(prompt_ids, new), logprob, len(new)


@torch.no_grad()
def score_text(model, tokenizer, text, device):
    """
    [(token text, log-probability)] of each token of text given the ones before it,
    starting from end-of-text (the start of a sentence) and ending with the prediction
    of end-of-text after it (that the sentence ends there).
    """
    ids = [tokenizer.eot] + tokenizer.encode(text) + [tokenizer.eot]
    ids = ids[-(model.config.block_size + 1):]
    x = torch.tensor([ids[:-1]], device=device)
    y = torch.tensor([ids[1:]], device=device)
    logits, _ = model(x, y)
    logprobs = torch.log_softmax(logits[0].float(), dim=-1).gather(1, y[0][:, None])[:, 0]  # (T,)
    pieces = [tokenizer.decode([t]) if t != tokenizer.eot else "<end>" for t in ids[1:]]
    return list(zip(pieces, logprobs.tolist()))


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


def interactive(sampler, stream):
    """A prompt loop: a line of text is a prompt, a line starting with / changes a setting."""
    c = sampler.config
    print("type a prompt and press Enter; /help for commands, /quit or Ctrl-D to leave", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.startswith("/"):
            try:
                for i in range(c["num_samples"]):
                    text = sampler.sample(sampler.prompt_ids(line), stream=stream)
                    if not stream:
                        print(text, flush=True)
            except KeyboardInterrupt:
                print()
            continue
        command, _, value = line[1:].strip().partition(" ")
        if command in ("quit", "exit", "q"):
            return
        if command == "help":
            print(HELP)
        elif command == "settings":
            print(", ".join(f"{k}={c[k]}" for k in ("temperature", "top_k", "top_p", "greedy", "max_new_tokens",
                                                   "num_samples", "repetition_penalty", "seed")))
        elif command == "greedy":
            c["greedy"] = not c["greedy"] if not value else value.lower() in ("on", "true", "1")
            print(f"greedy is {'on' if c['greedy'] else 'off'}")
        elif command in ("temperature", "top_k", "top_p", "max_new_tokens", "num_samples", "repetition_penalty", "seed"):
            before = dict(c)
            try:
                number = float(value) if command in ("temperature", "top_p", "repetition_penalty") else int(value)
                c[command] = None if command == "top_k" and number == 0 else number
                if command == "temperature" and number <= 0:
                    raise UserError(f"temperature must be > 0 (got {number}); for the most likely token use /greedy")
                check_sampling(c)
            except (ValueError, UserError) as e:
                c.update(before)
                print(f"error: {e if isinstance(e, UserError) else f'/{command} wants a number, got {value!r}'}")
                continue
            if command == "seed":
                sampler.generator.manual_seed(c["seed"])
            print(f"{command} = {c[command]}")
        else:
            print(f"unknown command /{command}; /help lists them")


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    temperatures = check_options(config)
    prompt = read_prompt(config["start"])
    device = pick_device(config["device"])
    model, tokenizer = load_sampling_model(config, device)
    sampler = Sampler(model, tokenizer, config, device)
    stream = sys.stdout.isatty() if config["stream"] is None else bool(config["stream"])

    if config["interactive"]:
        interactive(sampler, stream)
        return
    if config["score"] is not None:
        scores = score_text(model, tokenizer, config["score"], device)
        for piece, logprob in scores:
            print(f"{piece!r:>16} {logprob:9.4f}")
        total = sum(lp for _, lp in scores)
        print(f"total log-probability {total:.4f} over {len(scores)} tokens, perplexity {math.exp(-total / len(scores)):.3f}")
        return

    prompt_ids = sampler.prompt_ids(prompt)
    if config["beam"]:
        text, logprob, n = sampler.beam(prompt_ids)
        print(text)
        print(f"beam search, {config['beam']} beams: log-probability {logprob:.4f} over {n} tokens "
              f"({logprob / n:.4f} per token)")
        return
    if temperatures:
        width = max(len(f"{t:g}") for t in temperatures)
        for i in range(config["num_samples"]):
            for t in temperatures:
                print(f"temperature {t:<{width}g} | {sampler.sample(prompt_ids, temperature=t)}")
            if i < config["num_samples"] - 1:
                print()
        return
    num_samples = config["num_samples"]
    if config["greedy"] and num_samples > 1:
        print(f"note: --greedy gives the same text every time, so it is printed once (not {num_samples} times)", file=sys.stderr)
        num_samples = 1
    texts = []
    for i in range(num_samples):
        texts.append(sampler.sample(prompt_ids, stream=stream))
        if not stream:
            print(texts[-1])
        if i < num_samples - 1:
            print("---------------")
    if config["attention"]:
        ids = sampler.prompt_ids(texts[0])
        maps = [m.float().cpu() for m in model.attention_weights(torch.tensor([ids[-model.config.block_size:]], device=device))]
        labels = [token_label(tokenizer, t) for t in ids]
        plot_attention(maps, labels, config["attention"])
        print(f"saved attention heatmaps of {len(maps)} layers x {maps[0].size(0)} heads to {config['attention']}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
