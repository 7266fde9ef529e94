"""
bench.py's measures of decoding (docs/performance.md, "Generation at the memory-bandwidth
limit"): GPT-2 124M against transformers' generate in each precision, the measured memory
bandwidth and the bound it sets, speculative decoding with a self-draft and with a trained
pair; and the timing helper every generation rate of bench.py goes through.
"""

import copy
import os
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from tensegpt import tokenizer as tok
from tensegpt.checkpoint import load_model
from tensegpt.decode_weights import PRECISIONS, for_decoding, weight_bytes_per_token
from tensegpt.decoding import speculative_stream
from tensegpt.loss_eval import held_out_loss, total_nats
from tensegpt.sample_setup import load_draft


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tokens_per_sec(generate, new_tokens, device):
    """Tokens/s, the median of three runs of generate(new_tokens) (which says how many it made)."""
    generate(8)
    rates = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        made = generate(new_tokens)
        sync(device)
        rates.append(made / (time.perf_counter() - start))
    return statistics.median(rates)


def memory_bandwidth(device, megabytes=1024):
    """GB/s of a plain read of memory: the fastest of five torch.sum over a tensor larger than any cache."""
    big = torch.ones(megabytes << 18, device=device)  # megabytes MB of float32
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        big.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best / 1e9


def self_draft(model, n_layer):
    """A draft with the model's first n_layer blocks, its embeddings and final norm (self-speculation)."""
    draft = copy.deepcopy(model)
    draft.blocks = draft.blocks[:n_layer]
    draft.config = replace(draft.config, n_layer=n_layer)
    return draft


@torch.no_grad()
def bench_decoding(new_tokens, val_tokens, device, hf_config=None):
    """
    GPT-2 124M built locally (transformers' GPT2Config(), random weights, saved and read back
    as --init_from=hf: does), batch 1, temperature 0.8, top-k 200, KV cache on both sides:
    transformers' generate against generate_stream with the weights in each precision, the
    bytes each token reads against the measured bandwidth, and held-out bits per byte.
    """
    import transformers

    from tensegpt.hf import load_hf

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar

    bandwidth = memory_bandwidth(device)
    torch.manual_seed(0)
    hf_config = hf_config or transformers.GPT2Config()  # GPT-2 124M
    reference = transformers.GPT2LMHeadModel(hf_config).eval().to(device)
    eot = hf_config.vocab_size - 1  # GPT-2's <|endoftext|>, 50256
    prompt = torch.full((1, 1), eot, device=device)
    sampling = dict(do_sample=True, temperature=0.8, top_k=200, pad_token_id=eot)

    def hf_generate(n):
        return reference.generate(prompt, max_new_tokens=n, min_new_tokens=n, **sampling).size(1) - 1

    result = {"bandwidth_gb_per_s": bandwidth, "new_tokens": new_tokens}
    result["transformers_float32"] = tokens_per_sec(hf_generate, new_tokens, device)
    reference.to(torch.bfloat16)
    result["transformers_bfloat16"] = tokens_per_sec(hf_generate, new_tokens, device)
    reference.to(torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        base = load_hf(folder).to(device).eval()
    greedy = base.generate(prompt, 40, greedy=True)
    block_size = base.config.block_size
    # held-out nats over one window; their ratio is the ratio of bits per byte
    nats = lambda model: total_nats(model, val_tokens[: block_size + 1], block_size)[0]
    base_nats = nats(base)
    draft = for_decoding(self_draft(base, 2), "int8")  # speculative decoding: the first 2 layers, in int8
    for precision in PRECISIONS:
        model = for_decoding(copy.deepcopy(base), precision)
        generator = torch.Generator(device=device).manual_seed(0)

        def generate(n, model=model, generator=generator):
            return sum(1 for _ in model.generate_stream(prompt, n, temperature=0.8, top_k=200, generator=generator))

        rate = tokens_per_sec(generate, new_tokens, device)
        read = weight_bytes_per_token(model, context=new_tokens // 2)  # the cache halfway through
        result[precision] = {
            "tokens_per_sec": rate,
            "vs_transformers": rate / result["transformers_float32"],
            "mb_per_token": read / 1e6,
            "bound_tokens_per_sec": bandwidth * 1e9 / read,
            "share_of_bound": rate * read / (bandwidth * 1e9),
            "bits_per_byte_vs_float32": nats(model) / base_nats - 1,
            "greedy_text_unchanged": torch.equal(model.generate(prompt, 40, greedy=True), greedy),
        }
        if precision != "bfloat16":
            result[precision]["speculative_self_draft"] = [
                bench_speculative(model, draft, prompt, new_tokens, k) for k in (4, 6)
            ]
    return result


def bench_speculative(model, draft, prompt, new_tokens, draft_tokens=4):
    """Greedy tokens/s alone and with the draft proposing draft_tokens at a time, and the share kept."""
    device = prompt.device.type
    stats = {}

    def alone(n):
        return sum(1 for _ in model.generate_stream(prompt, n, greedy=True))

    def drafted(n):
        return sum(1 for _ in speculative_stream(model, draft, prompt, n, draft_tokens, greedy=True, stats=stats))

    plain, fast = tokens_per_sec(alone, new_tokens, device), tokens_per_sec(drafted, new_tokens, device)
    return {
        "alone_tokens_per_sec": plain,
        "with_draft_tokens_per_sec": fast,
        "speedup": fast / plain,
        "accepted": stats["accepted"] / stats["proposed"],
        "draft_tokens": draft_tokens,
    }


def bench_checkpoint_pair(ckpt, draft_ckpt, new_tokens, device):
    """A trained model and a smaller draft on the same tokens: speculative decoding, and its precisions."""
    model, tokenizer, checkpoint = load_model(ckpt, device)
    draft = load_draft({"draft": draft_ckpt, "draft_precision": "int8"}, tokenizer, device)  # sample.py's
    decoded = {precision: for_decoding(copy.deepcopy(model), precision) for precision in PRECISIONS}
    prompt = torch.tensor([[tokenizer.eot]], device=device)
    speculative = [bench_speculative(decoded["float32"], draft, prompt, new_tokens, k) for k in (4, 6)]
    result = {"speculative": speculative}
    data_dir = checkpoint.get("train_config", {}).get("data_dir")
    if data_dir and os.path.isdir(data_dir):  # held-out bits per byte in each precision
        meta = tok.read_meta(data_dir)
        val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
        for precision, fast in decoded.items():
            result[precision] = held_out_loss(fast, val, meta, tokenizer, batch_size=8)["bits_per_byte"]
    return result


def print_decoding(report):
    """GPT-2 124M's generation per precision, and the speculative pairs."""
    if "decoding" in report:
        d = report["decoding"]
        print(
            f"GPT-2 124M generation, batch 1, {d['new_tokens']} tokens, T=0.8, top-k 200; "
            f"memory reads {d['bandwidth_gb_per_s']:.1f} GB/s; "
            f"transformers {d['transformers_float32']:.1f} tokens/s (float32), {d['transformers_bfloat16']:.1f} "
            "(bfloat16)"
        )
        print(f"{'':12} {'tokens/s':>9} {'vs HF':>6} {'MB/token':>9} {'bound':>7} {'of bound':>9} {'bits/B':>8}")
        for precision in PRECISIONS:
            r = d[precision]
            print(
                f"{precision:12} {r['tokens_per_sec']:>9.1f} {r['vs_transformers']:>5.2f}x {r['mb_per_token']:>9.0f} "
                f"{r['bound_tokens_per_sec']:>7.1f} {100 * r['share_of_bound']:>8.0f}% "
                f"{100 * r['bits_per_byte_vs_float32']:>+7.3f}%   greedy text "
                f"{'unchanged' if r['greedy_text_unchanged'] else 'differs'}"
            )
    decoding = report.get("decoding", {})
    pairs = {
        f"GPT-2 124M in {p}, its first 2 layers in int8 as the draft": decoding[p]["speculative_self_draft"]
        for p in PRECISIONS
        if "speculative_self_draft" in decoding.get(p, {})
    }
    if "checkpoint_pair" in report:
        pairs[f"{report['ckpt']} drafted by {report['draft']} in int8"] = report["checkpoint_pair"]["speculative"]
    for name, runs in pairs.items():
        for r in runs:
            print(
                f"speculative decoding (greedy, {r['draft_tokens']} drafts a pass), {name}: "
                f"{r['alone_tokens_per_sec']:.1f} -> {r['with_draft_tokens_per_sec']:.1f} tokens/s "
                f"({r['speedup']:.2f}x), {100 * r['accepted']:.0f}% of drafts kept"
            )
    pair = report.get("checkpoint_pair", {})
    if "float32" in pair:
        print(f"  {report['ckpt']}, held-out bits per byte: " + ", ".join(f"{p} {pair[p]:.5f}" for p in PRECISIONS))
