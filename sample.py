"""
Generates text from a trained model.

    python sample.py --start="The baby is"
    python sample.py --start=FILE:prompt.txt --num_samples=5 --temperature=0.6 --top_k=20
    python sample.py --start="She has" --greedy

The prompt is encoded with the tokenizer recorded in the checkpoint. Each sample stops
at the end-of-text token (the end of a sentence, for tense.txt) or after max_new_tokens.
An empty --start (the default) starts from the end-of-text token: the model begins a
new sentence of its own. A prompt longer than the model's context keeps its last
block_size tokens (a note says so on stderr). The same --seed gives the same text.
"""
import os
import sys

import torch

from common import UserError, load_model, main_guard, parse_config, pick_device

DEFAULTS = {
    "ckpt": "out/trained.pth",
    "start": "",  # the prompt; FILE:path reads it from a file; empty starts a new sentence
    "num_samples": 3,
    "max_new_tokens": 100,
    "temperature": 0.8,  # < 1 sharper, > 1 flatter
    "top_k": None,  # keep only the k most likely tokens
    "top_p": 1.0,  # keep the smallest set of likely tokens whose probability reaches top_p
    "greedy": False,  # always the most likely token (temperature, top_k, top_p unused)
    "seed": 1337,
    "device": "auto",
}


def check_sampling(config):
    if not config["greedy"] and config["temperature"] <= 0:
        raise UserError(f"--temperature must be > 0 (got {config['temperature']}); for the most likely token use --greedy")
    if config["top_k"] is not None and (not isinstance(config["top_k"], int) or config["top_k"] < 1):
        raise UserError(f"--top_k must be a whole number >= 1 (got {config['top_k']!r}); leave it out to keep every token")
    if not 0.0 < config["top_p"] <= 1.0:
        raise UserError(f"--top_p must be in (0, 1] (got {config['top_p']}); 1.0 keeps every token")
    for key in ("num_samples", "max_new_tokens"):
        if config[key] < 1:
            raise UserError(f"--{key} must be at least 1 (got {config[key]})")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} does not exist (from --start=FILE:{path})")
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    return start


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_sampling(config)
    prompt = read_prompt(config["start"])
    device = pick_device(config["device"])
    model, tokenizer, _ = load_model(config["ckpt"], device)

    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot]
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    for i in range(config["num_samples"]):
        out = model.generate(
            idx, config["max_new_tokens"], temperature=config["temperature"], top_k=config["top_k"],
            top_p=config["top_p"], greedy=config["greedy"], stop_token=tokenizer.eot, generator=generator,
        )[0].tolist()
        new = out[len(ids):]
        if tokenizer.eot in new:
            new = new[: new.index(tokenizer.eot)]
        shown = [t for t in ids if t != tokenizer.eot] + new
        print(tokenizer.decode(shown))
        if i < config["num_samples"] - 1:
            print("---------------")


if __name__ == "__main__":
    main_guard(main)
