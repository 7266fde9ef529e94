"""
Decoding speed in llama.cpp beside sample.py's own (docs/performance.md, "llama.cpp as the
anchor"): GPT-2 124M (random weights, built locally as bench.py builds it) and a trained
checkpoint, exported to GGUF in F32, F16 and Q8_0 and run by llama.cpp (llama-cpp-python),
against generate_stream with the weights in each of sample.py's layouts. One sitting, batch
1, greedy, the same one-token prompt and length on both sides, the same threads; each
side's bytes read per token against the measured memory bandwidth.

    python -m tensegpt.gguf_bench --ckpt=out/trained.pth --tokens=128
"""

import copy
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

from tensegpt.checkpoint import load_model, save
from tensegpt.common import main_guard, parse_config
from tensegpt.data import open_split
from tensegpt.decode_bench import memory_bandwidth, tokens_per_sec
from tensegpt.decode_weights import PRECISIONS, for_decoding, weight_bytes_per_token
from tensegpt.tokenizer import decode_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {
    "ckpt": "out/trained.pth",  # a trained checkpoint measured beside GPT-2 124M; empty: GPT-2 124M only
    "tokens": 128,  # tokens made per run (the median of three runs is kept)
    "threads": 0,  # threads on both sides; 0: every core
    "outtypes": "f32,f16,q8_0,q5_0,q4_0",  # the GGUF files measured
}


def gpt2_124m_checkpoint(path):
    """GPT-2 124M with random weights, as a checkpoint of this project (transformers' GPT2Config, read back)."""
    import transformers

    from tensegpt.hf import load_hf
    from tensegpt.tokenizer import GPT2

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        model = load_hf(folder)
    save({"model": model.state_dict(), "model_config": vars(model.config), "tokenizer_meta": GPT2().meta()}, path)


def ours(ckpt, new_tokens):
    """{layout: (tokens/s, MB read per token)} of generate_stream, greedy from end-of-text."""
    model, tokenizer, _ = load_model(ckpt)
    prompt = torch.tensor([[tokenizer.eot]])
    result = {}
    for precision in PRECISIONS:
        fast = for_decoding(copy.deepcopy(model), precision)

        def generate(n, fast=fast):
            return sum(1 for _ in fast.generate_stream(prompt, n, greedy=True))

        n = min(new_tokens, model.config.block_size - 1)
        result[precision] = (tokens_per_sec(generate, n, "cpu"), weight_bytes_per_token(fast, context=n // 2) / 1e6)
    return result


def llama_cpp(path, eot, block_size, new_tokens, threads):
    """(tokens/s, MB of the file) of llama.cpp generating greedily from end-of-text."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=block_size, n_threads=threads, n_threads_batch=threads,
                          verbose=False)  # fmt: skip
    n = min(new_tokens, block_size - 1)
    rate = tokens_per_sec(lambda n: len(greedy(llm, [eot], n)), n, "cpu")
    llm.close()
    return rate, os.path.getsize(path) / 1e6


def greedy(llm, ids, n):
    """n tokens (or fewer, at the end-of-text) of llama.cpp's greedy continuation of ids."""
    llm.reset()
    made = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(made) == n:
            break
        made.append(token)
    return made


def fidelity(paths, ckpt, prompts=200, new_tokens=24, lines=500):
    """
    What each GGUF file keeps of the checkpoint: the share of prompts (the first two words of tense.txt's last
    lines) on which its greedy continuation is the checkpoint's own (sample.py --greedy, float32); of those where
    it is not, the share that part where the checkpoint's own two likeliest tokens lie within 0.02 nats (a tie
    the model cannot decide); and bits per byte over the first val lines of the checkpoint's data, each after
    end-of-text (the checkpoint's own under "checkpoint").
    """
    import llama_cpp

    model, tokenizer, checkpoint = load_model(ckpt)
    with open(os.path.join(ROOT, "tense.txt"), encoding="utf-8") as f:
        starts = [tokenizer.encode(" ".join(line.split()[:2])) for line in f.read().splitlines()[-prompts:]]
    data_dir = checkpoint.get("train_config", {}).get("data_dir") or "data"
    val = [tokenizer.encode(text) for text in decode_examples(tokenizer, open_split(data_dir, "val"))[:lines]]
    val_bytes = sum(len(tokenizer.decode(ids).encode()) for ids in val)

    def own_logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]), logits_at=torch.arange(len(ids)))[0][:, : tokenizer.vocab_size].float()

    def bits_per_byte(logits_of):
        nats = 0.0
        for ids in val:
            logprobs = torch.log_softmax(logits_of([tokenizer.eot] + ids), dim=-1)
            nats -= float(logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum())
        return nats / math.log(2) / val_bytes

    result = {"checkpoint": {"bits_per_byte": bits_per_byte(own_logits)}}
    for outtype, path in paths.items():
        llm = llama_cpp.Llama(model_path=path, n_ctx=model.config.block_size, logits_all=True, verbose=False)
        same, ties = 0, 0
        for ids in starts:
            theirs = greedy(llm, ids, new_tokens)
            made = ids + theirs
            logits = own_logits(made)[len(ids) - 1 :]
            own = logits.argmax(-1).tolist()
            # where the checkpoint would pick otherwise (or would end the text), and how sure it is there
            differs = next((i for i, t in enumerate(theirs) if own[i] != t), None)
            if differs is None and (len(theirs) == new_tokens or own[len(theirs)] == tokenizer.eot):
                same += 1
                continue
            at = logits[differs if differs is not None else len(theirs)]
            top = at.topk(2).values
            ties += float(top[0] - top[1]) < 0.02

        def logits_of(ids, llm=llm):
            llm.reset()
            llm.eval(ids)
            return torch.tensor(np.array(llm.scores[: len(ids)]))

        result[outtype] = {"same_greedy": same / len(starts), "differs_at_a_tie": ties / max(1, len(starts) - same),
                           "bits_per_byte": bits_per_byte(logits_of)}  # fmt: skip
        llm.close()
    return result


def measure(name, ckpt, config, threads, folder, bandwidth):
    model, tokenizer, _ = load_model(ckpt)
    rows = [(f"sample.py {p}", *r) for p, r in ours(ckpt, config["tokens"]).items()]
    paths = {}
    for outtype in config["outtypes"].split(","):
        path = paths[outtype] = os.path.join(folder, f"{name.replace(os.sep, '_')}-{outtype}.gguf")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--ckpt={ckpt}", "--format=gguf",
                        f"--outtype={outtype}", f"--out={path}"], check=True, capture_output=True)  # fmt: skip
        rows.append((f"llama.cpp {outtype.upper()}", *llama_cpp(path, tokenizer.eot, model.config.block_size,
                                                                 config["tokens"], threads)))  # fmt: skip
    print(f"{name}: {model.num_params() / 1e6:.1f}M parameters, batch 1, greedy, {config['tokens']} tokens, "
          f"{threads} threads; memory reads {bandwidth:.1f} GB/s")  # fmt: skip
    print(f"{'':22} {'tokens/s':>9} {'MB/token':>9} {'bound':>8} {'of bound':>9}")
    for label, rate, mb in rows:
        bound = bandwidth * 1e3 / mb
        print(f"{label:22} {rate:>9.1f} {mb:>9.1f} {bound:>8.0f} {100 * rate / bound:>8.0f}%")
    return paths


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    threads = config["threads"] or os.cpu_count()
    torch.set_num_threads(threads)
    bandwidth = memory_bandwidth("cpu")
    with tempfile.TemporaryDirectory() as folder:
        gpt2 = os.path.join(folder, "gpt2.pth")
        gpt2_124m_checkpoint(gpt2)
        measure("GPT-2 124M", gpt2, config, threads, folder, bandwidth)
        if config["ckpt"]:
            paths = measure(config["ckpt"], config["ckpt"], config, threads, folder, bandwidth)
            kept = fidelity(paths, config["ckpt"])
            print(f"what each file keeps of {config['ckpt']}: greedy text of 200 prompts (two words of tense.txt's "
                  "last lines) the checkpoint's own; where it differs, the share at a tie (the checkpoint's two "
                  "likeliest within 0.02 nats); bits per byte of 500 val lines")  # fmt: skip
            print(f"{'checkpoint':22} {'':>9} {'':>9} {kept['checkpoint']['bits_per_byte']:>8.5f}")
            for outtype in paths:
                k = kept[outtype]
                print(f"{'llama.cpp ' + outtype.upper():22} {100 * k['same_greedy']:>8.1f}% "
                      f"{100 * k['differs_at_a_tie']:>8.0f}% {k['bits_per_byte']:>8.5f}")  # fmt: skip


if __name__ == "__main__":
    main_guard(main)
