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
    python sample.py --start="The baby is" --precision=int8            # int8 weights: faster tokens
    python sample.py --start="The baby is" --draft=out-tiny/trained.pth  # speculative decoding

The prompt is encoded with the tokenizer recorded in the checkpoint. Each sample stops
at the end-of-text token (the end of a sentence, for tense.txt) or after max_new_tokens.
An empty --start (the default) starts from the end-of-text token: the model begins a
new sentence of its own. A prompt longer than the model's context keeps its last
block_size tokens (a note says so on stderr). The same --seed gives the same text.
"""

import math
import sys

import torch

from tensegpt.common import main_guard, parse_config, pick_device
from tensegpt.decode_weights import for_decoding
from tensegpt.decoding import answer, beam_search, speculative_stream
from tensegpt.sample_setup import (
    Printer,
    attention_weights,
    check_chat_model,
    check_options,
    fit_history,
    load_draft,
    load_sampling_model,
    plot_attention,
    read_prompt,
    report_drafts,
    run_command,
    sampling_of,
    token_label,
)

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to sample from
    "init_from": "",  # hf:FOLDER samples from Hugging Face GPT-2 weights instead of --ckpt
    "start": "",  # the prompt; FILE:path reads it from a file; empty starts a new sentence
    "num_samples": 3,  # how many continuations
    "max_new_tokens": 100,  # the most tokens per continuation
    "temperature": 0.8,  # < 1 sharper, > 1 flatter, 0 to 2 (0: the most likely token)
    "top_k": None,  # keep only the k most likely tokens (None or 0: every token)
    "top_p": 1.0,  # keep the smallest set of likely tokens whose probability reaches top_p
    "greedy": False,  # always the most likely token (temperature, top_k, top_p unused)
    "repetition_penalty": 1.0,  # > 1 makes tokens already in the text less likely (0.01 to 100)
    "seed": 1337,  # the same seed gives the same text (0 to 2**63 - 1)
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    "stream": None,  # print tokens as they come; None: when writing to a terminal
    "temperatures": None,  # e.g. 0.2,0.8,1.2: the same prompt at each temperature, side by side
    "beam": 0,  # > 0: beam search with this many beams instead of sampling
    "length_penalty": 1.0,  # beam search ranks by log-probability / length**length_penalty
    "score": None,  # a text to score: per-token log-probabilities and perplexity
    "attention": "",  # a PNG path: heatmaps of every layer's and head's attention (needs matplotlib)
    "interactive": False,  # a prompt loop on standard input; /help lists its commands
    "chat": False,  # talk to a chat model; with --start, answer that one message and exit
    "precision": "float32",  # the weights generation reads: 'float32', 'bfloat16' or 'int8' (weight-only)
    "draft": "",  # a smaller checkpoint on the same tokens proposes them, the model checks (speculative)
    "draft_tokens": 4,  # how many tokens the draft proposes per check
    "draft_precision": "int8",  # the draft's weights: only the speed changes, never the text
}


# ----------------------------------------------------------------------------- prompt in, text out


class Sampler:
    """A model, its tokenizer and the settings: turns prompts into text."""

    def __init__(self, model, tokenizer, config, device, draft=None):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.generator = torch.Generator(device=device).manual_seed(config["seed"])
        self.draft, self.draft_stats = draft, {}

    def prompt_ids(self, prompt):
        unknown = self.tokenizer.unknown(prompt)
        if unknown:
            what = "characters" if self.tokenizer.name == "char" else "words"
            effect = "dropped" if self.tokenizer.name == "char" else "read as <unk>"
            print(
                f"note: {len(unknown)} {what} of the prompt are not in the vocabulary, {effect}: "
                f"{' '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}",
                file=sys.stderr,
            )
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot]
        block_size = self.model.config.block_size
        if len(ids) > block_size:
            print(
                f"note: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
                f"keeping its last {block_size}",
                file=sys.stderr,
            )
            ids = ids[-block_size:]
        return ids

    def text(self, prompt_ids, new_ids):
        """The prompt and the new tokens up to end-of-text, as text."""
        eot = self.tokenizer.eot
        if eot in new_ids:
            new_ids = new_ids[: new_ids.index(eot)]
        return self.tokenizer.decode([t for t in prompt_ids if t != eot] + list(new_ids))

    def settings(self, temperature=None):
        """The sampling settings generate_stream takes."""
        c = self.config
        sampling = sampling_of(c, temperature)
        chosen = dict(temperature=sampling.temperature, top_k=sampling.kept(), top_p=sampling.top_p)
        return chosen | dict(greedy=sampling.greedy(), repetition_penalty=sampling.repetition_penalty,
                             generator=self.generator)  # fmt: skip

    def generate(self, idx, max_new_tokens, **settings):
        """The new ids one at a time: from the model alone, or as drafts it checked (--draft)."""
        # a repetition penalty (/repetition_penalty in the loop) changes the distribution: the model alone
        if self.draft is None or settings["repetition_penalty"] != 1.0:
            return self.model.generate_stream(idx, max_new_tokens, **settings)
        # the same text, more tokens per pass of the model: see tensegpt/decoding.py
        del settings["repetition_penalty"]
        draft_tokens = self.config["draft_tokens"]
        return speculative_stream(
            self.model, self.draft, idx, max_new_tokens, draft_tokens, stats=self.draft_stats, **settings
        )

    def sample(self, prompt_ids, temperature=None, stream=False):
        """One continuation of prompt_ids, printed piece by piece if stream; returns its text."""
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        settings = {**self.settings(temperature), "stop_token": self.tokenizer.eot}
        steps = self.generate(idx, self.config["max_new_tokens"], **settings)
        new, printer = [], Printer()
        for step in steps:
            new.append(step.item())
            if stream:
                printer(self.text(prompt_ids, new))
        text = self.text(prompt_ids, new)
        if stream:
            printer.finish(text)
        return text


# ----------------------------------------------------------------------------- the modes


def continuations(sampler, prompt_ids, stream):
    """The default: num_samples continuations of the prompt (printed as they come if stream)."""
    c, texts = sampler.config, []
    num_samples = c["num_samples"]
    if c["greedy"] and num_samples > 1:
        print(
            f"note: --greedy gives the same text every time, so it is printed once (not {num_samples} times)",
            file=sys.stderr,
        )
        num_samples = 1
    for i in range(num_samples):
        texts.append(sampler.sample(prompt_ids, stream=stream))
        if not stream:
            print(texts[-1])
        if i < num_samples - 1:
            print("---------------")
    return texts


def temperature_table(sampler, prompt_ids, temperatures):
    """--temperatures: the same prompt at each temperature, side by side."""
    width = max(len(f"{t:g}") for t in temperatures)
    for i in range(sampler.config["num_samples"]):
        for t in temperatures:
            print(f"temperature {t:<{width}g} | {sampler.sample(prompt_ids, temperature=t)}")
        if i < sampler.config["num_samples"] - 1:
            print()


def beam(sampler, prompt_ids):
    """--beam: the most likely continuation that beam search finds, and its log-probability."""
    c = sampler.config
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=sampler.device)
    new, logprob = beam_search(
        sampler.model,
        idx,
        c["beam"],
        c["max_new_tokens"],
        stop_token=sampler.tokenizer.eot,
        length_penalty=c["length_penalty"],
    )
    print(sampler.text(prompt_ids, new))
    print(
        f"beam search, {c['beam']} beams: log-probability {logprob:.4f} over {len(new)} tokens "
        f"({logprob / len(new):.4f} per token)"
    )


@torch.no_grad()
def score_text(model, tokenizer, text, device):
    """
    [(token text, log-probability)] of each token of text given the ones before it,
    starting from end-of-text (the start of a sentence) and ending with the prediction
    of end-of-text after it (that the sentence ends there).
    """
    ids = [tokenizer.eot] + tokenizer.encode(text) + [tokenizer.eot]
    ids = ids[-(model.config.block_size + 1) :]
    x = torch.tensor([ids[:-1]], device=device)
    y = torch.tensor([ids[1:]], device=device)
    logits, _ = model(x, y)
    logprobs = torch.log_softmax(logits[0].float(), dim=-1).gather(1, y[0][:, None])[:, 0]  # (T,)
    pieces = [tokenizer.decode([t]) if t != tokenizer.eot else "<end>" for t in ids[1:]]
    return list(zip(pieces, logprobs.tolist()))


def score(model, tokenizer, text, device):
    """--score: each token's log-probability, the total and the perplexity."""
    scores = score_text(model, tokenizer, text, device)
    for piece, logprob in scores:
        print(f"{piece!r:>16} {logprob:9.4f}")
    total = sum(lp for _, lp in scores)
    print(
        f"total log-probability {total:.4f} over {len(scores)} tokens, perplexity {math.exp(-total / len(scores)):.3f}"
    )


def draw_attention(model, sampler, text, path):
    """--attention: every layer's and head's attention weights over a text, as heatmaps (model: as loaded)."""
    tokenizer = sampler.tokenizer
    ids = sampler.prompt_ids(text)[-model.config.block_size :]
    maps = [m.float().cpu() for m in attention_weights(model, torch.tensor([ids], device=sampler.device))]
    plot_attention(maps, [token_label(tokenizer, t) for t in ids], path)
    print(f"saved attention heatmaps of {len(maps)} layers x {maps[0].size(0)} heads to {path}", file=sys.stderr)


def interactive(sampler, stream):
    """--interactive: a line of text is a prompt; a line starting with / changes a setting."""
    print("type a prompt and press Enter; /help for commands, /quit or Ctrl-D to leave", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.startswith("/"):
            if not run_command(sampler, line):
                return
            continue
        try:
            for _ in range(sampler.config["num_samples"]):
                text = sampler.sample(sampler.prompt_ids(line), stream=stream)
                if not stream:
                    print(text, flush=True)
        except KeyboardInterrupt:
            print()


def chat(sampler, first_message, stream):
    """--chat: a conversation in the chat template; each reply streams and ends at <|end|>."""
    model, tokenizer, c = sampler.model, sampler.tokenizer, sampler.config
    check_chat_model(tokenizer, c["ckpt"])
    if first_message is None:
        print("talk to the model; Ctrl-D or /quit to leave", flush=True)
    history = []
    while True:
        message = first_message
        if message is None:
            try:
                message = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if message.strip() in ("/quit", "/exit"):
                return
        # the prompt fits in 3/4 of the context (the oldest turns dropped whole), 1/4 is for the reply
        room = model.config.block_size * 3 // 4
        history = fit_history(tokenizer, history + [{"role": "user", "content": message}], room)
        if first_message is None:
            print("model> ", end="", flush=True)
        printer = Printer()
        reply = answer(
            model, tokenizer, history, c["max_new_tokens"], printer if stream else None,
            generate=sampler.generate, **sampler.settings(),
        )  # fmt: skip
        printer.finish(reply) if stream else print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})
        if first_message is not None:
            return


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    temperatures = check_options(config)
    prompt = read_prompt(config["start"])
    device = pick_device(config["device"])
    model, tokenizer = load_sampling_model(config, device)
    model = for_decoding(model, config["precision"])  # each weight read once per token, as fast as it reads
    draft = load_draft(config, tokenizer, device)
    sampler = Sampler(model, tokenizer, config, device, draft)
    stream = sys.stdout.isatty() if config["stream"] is None else bool(config["stream"])

    if config["interactive"]:
        interactive(sampler, stream)
    elif config["chat"]:
        chat(sampler, prompt or None, stream)
    elif config["score"] is not None:
        score(model, tokenizer, config["score"], device)
    elif config["beam"]:
        beam(sampler, sampler.prompt_ids(prompt))
    elif temperatures:
        temperature_table(sampler, sampler.prompt_ids(prompt), temperatures)
    else:
        texts = continuations(sampler, sampler.prompt_ids(prompt), stream)
        if config["attention"]:
            # the model as the checkpoint has it: the one sampled from may hold its weights laid out for decoding
            draw_attention(load_sampling_model(config, device)[0], sampler, texts[0], config["attention"])
    report_drafts(sampler.draft_stats)


if __name__ == "__main__":
    main_guard(main)
