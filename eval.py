"""
Shows what a trained model learned, as numbers.

    python eval.py                                   # out/trained.pth on the data it was trained on
    python eval.py --ckpt=out-tiny/trained.pth --json
    python eval.py --num_samples=500 --probe_per_tense=50 --picture=probe.png

1. Held-out loss, comparable across tokenizers: val loss, perplexity and bits per byte
   (total nats over the val split / ln 2 / its UTF-8 bytes). A char model and a GPT-2
   model cut the same text into different tokens; per byte they compare.
2. For a model trained on tense.txt (its val text parses with make_tense.py's grammar),
   correct sentences: a sentence is correct when the grammar can produce it, its time
   phrase (if any) agrees with the verb's tense, and its subject may do its verb (no baby
   driving a bus). The share is measured three ways, num_samples sentences from an empty
   prompt, num_samples after the grammar's subjects, and time_prompts after a time phrase
   of one tense ("Yesterday, the baby"); the headline is the worst of the three, with the
   parts beneath it. Also, over the first two: grammatical, tense_agreement (of those with
   a time phrase), semantic_errors and novel (not a line of the training text).
3. A minimal-pairs probe: held-out statements of each tense, each scored after a time
   phrase of each of the twelve tenses ("Yesterday, the baby ate an apple." against
   "Tomorrow, the baby ate an apple."): the model "prefers" the tense whose phrase makes
   the rest of the sentence most likely. Accuracy per tense (chance: 1 in 12), and a
   12 x 12 picture of verb tense x preferred tense (with matplotlib).
For a chat model (its data holds conversations), exact match instead: each held-out
conversation's answers generated greedily and compared with the reference, per task and per
tense asked for, beside the model it was fine-tuned from. make_tense.py's held-out file tags
each conversation as worded like training ("seen") or by a phrasing family training never
used ("held-out"): the two are reported side by side, with the held-out families named.
Other models get part 1 and a one-line note.
"""

import json
import os
import random
import sys

import numpy as np
import torch

from model import GPT
from tensegpt import grammar, instructions
from tensegpt.chat import decode_conversations, read_val_tags
from tensegpt.checkpoint import load_model
from tensegpt.common import (
    UserError,
    check_output_file,
    check_seed,
    main_guard,
    parse_config,
    pick_device,
    pyplot,
    save_figure,
)
from tensegpt.data import open_split
from tensegpt.decoding import greedy_answers
from tensegpt.loss_eval import held_out_loss
from tensegpt.run_setup import fine_tuning_start
from tensegpt.sequence import Sampling, SettingError, check_sampling
from tensegpt.tokenizer import decode_examples, read_meta
from tensegpt.tokenizer import from_meta as tokenizer_from_meta

DEFAULTS = {
    "ckpt": "out/trained.pth",  # the checkpoint to evaluate
    "data_dir": "",  # the prepared data to score; empty: the data_dir the checkpoint was trained on
    "num_samples": 1000,  # sentences sampled from an empty prompt, and as many after the grammar's subjects
    "temperature": 0.8,  # of those samples (sample.py's default)
    "time_prompts": 1008,  # prompts opening with a time phrase ("Yesterday, the baby"), spread over the 12 tenses
    "max_new_tokens": 60,  # the most tokens per sampled sentence
    "probe_per_tense": 25,  # held-out statements per tense in the minimal-pairs probe
    "picture": "",  # PNG of the probe's 12 x 12 table; empty: probe.png beside the checkpoint
    "batch_size": 64,  # sequences per forward pass when scoring
    "seed": 1337,  # sampling and the probe's sentences (0 to 2**32 - 1)
    "device": "auto",  # 'auto', 'cpu', 'cuda', 'mps'
    "json": False,  # print the report as JSON
    "chat_samples": 600,  # chat models: held-out conversations in the exact-match check
}
TENSES = grammar.TENSES
# the phrases that agree with one tense only: a probe must not offer "today" as another tense
ONLY = {t: [p for p in grammar.TIMES[t] if grammar.PHRASE_TENSES[p] == {t}] for t in TENSES}


def check_options(config):
    for key in ("num_samples", "time_prompts", "max_new_tokens", "probe_per_tense", "batch_size", "chat_samples"):
        if config[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {config[key]}")
    try:
        check_sampling(Sampling(temperature=config["temperature"]))
    except SettingError as e:
        raise UserError(f"--{e}") from None
    check_seed(config)
    if config["picture"]:
        check_output_file(config["picture"], "picture", {"png"})


def load_split(data_dir, split, tokenizer_meta):
    """(token ids of a split, meta.json) of a folder, refusing one the checkpoint's tokenizer cannot read."""
    meta = read_meta(data_dir)
    if tokenizer_from_meta(meta).meta() != tokenizer_meta:
        raise UserError(
            f"{data_dir}/ was prepared with another tokenizer than the checkpoint's: "
            "pass the --data_dir it was trained on"
        )
    return np.asarray(open_split(data_dir, split, meta)), meta


@torch.no_grad()
def sample_sentences(model, tokenizer, config, device):
    """(num_samples sentences from an empty prompt, num_samples spread over the grammar's subjects)."""
    n = config["num_samples"]
    subjects = [s for s, _, _ in grammar.SUBJECTS]
    groups = [[s] * k for s, k in zip(subjects, spread(n, len(subjects))) if k]
    return complete(model, tokenizer, [[""] * n], config, device), complete(model, tokenizer, groups, config, device)


def time_phrase_prompts(config):
    """
    {tense: prompts that open with a time phrase of that tense only ("Yesterday, the baby")}:
    a model must then carry on in that tense. time_prompts // 12 per tense, at least one.
    """
    rng = random.Random(config["seed"])
    per_tense = max(1, config["time_prompts"] // len(TENSES))
    prompts = {}
    for tense in TENSES:
        prompts[tense] = []
        for _ in range(per_tense):
            phrase, (subject, _, _) = rng.choice(ONLY[tense]), rng.choice(grammar.SUBJECTS)
            inner = subject if subject.split()[0] in grammar.NAMES else subject[0].lower() + subject[1:]
            prompts[tense].append(f"{phrase[0].upper()}{phrase[1:]}, {inner}")
    return prompts


def time_phrase_check(model, tokenizer, config, device, table, lowercase):
    """
    The sentences after time-phrase prompts: their texts, and per tense the share that parse
    in the phrase's tense (does the model keep the tense the phrase asks for?).
    """
    per_tense, bad, every, prompts_of = {}, [], [], time_phrase_prompts(config)
    for tense, prompts in prompts_of.items():
        by_length = {}  # prompts of as many tokens make one batch
        for prompt in prompts:
            by_length.setdefault(len(tokenizer.encode(prompt)), []).append(prompt)
        texts = complete(model, tokenizer, list(by_length.values()), config, device)
        parsed = [grammar.parse(t, table, lowercase) for t in texts]
        kept = [p is not None and p["agrees"] for p in parsed]
        per_tense[tense] = sum(kept) / len(texts)
        bad += [t for t, k in zip(texts, kept) if not k]
        every += texts
    report = {
        "time_prompts": sum(len(p) for p in prompts_of.values()),
        "time_prompt_agreement": sum(per_tense.values()) / len(per_tense),
        "time_prompt_per_tense": per_tense,
        "examples_bad_time_prompt": bad[:20],
    }
    return report, every


def correctness(texts, table, lowercase):
    """
    The share of texts that are correct sentences (parse, agree with their time phrase, the
    subject may do the verb), each part's share, and what was wrong with the first misses.
    """
    parsed = [grammar.parse(t, table, lowercase) for t in texts]
    wrong = []
    for text, p in zip(texts, parsed):
        if p is None:
            wrong.append((text, "not grammatical"))
        elif not p["agrees"]:
            wrong.append((text, f"a {p['tense']} verb after a time phrase of another tense"))
        elif not p["sensible"]:
            wrong.append((text, "the subject cannot do that"))
    good = [p for p in parsed if p is not None]
    share = lambda part, whole: part / whole if whole else 0.0
    return {
        "samples": len(texts),
        "correct": share(len(texts) - len(wrong), len(texts)),
        "grammatical": share(len(good), len(texts)),
        "agrees": share(sum(p["agrees"] for p in good), len(good)),
        "sensible": share(sum(p["sensible"] for p in good), len(good)),
        "examples_wrong": [{"text": t, "why": why} for t, why in wrong[:10]],
    }


def complete(model, tokenizer, groups, config, device):
    """Groups of prompts of as many tokens (each group one batch) -> one sampled sentence per prompt."""
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    texts = []
    for group in groups:
        rows = [[tokenizer.eot] + tokenizer.encode(p) for p in group]
        greedy = Sampling(temperature=config["temperature"]).greedy()
        sampling = {"temperature": config["temperature"], "greedy": greedy, "stop_token": tokenizer.eot,
                    "generator": generator}  # fmt: skip
        out = model.generate(torch.tensor(rows, device=device), config["max_new_tokens"], **sampling)
        for prompt_ids, row in zip(rows, out[:, len(rows[0]) :].tolist()):
            row = row[: row.index(tokenizer.eot)] if tokenizer.eot in row else row
            texts.append(tokenizer.decode(prompt_ids[1:] + row).strip())
    return texts


def spread(total, parts):
    return [total // parts + (i < total % parts) for i in range(parts)]


def grammar_check(texts, train_lines, table, lowercase):
    """Shares of texts by make_tense's grammar; table is grammar.cores(lowercase)."""
    parsed = [grammar.parse(t, table, lowercase) for t in texts]
    good = [(t, p) for t, p in zip(texts, parsed) if p is not None]
    timed = [p for _, p in good if p["time"]]
    known = {line.lower() for line in train_lines} if lowercase else set(train_lines)
    share = lambda part, whole: part / whole if whole else 0.0
    return {
        "samples": len(texts),
        "grammatical": share(len(good), len(texts)),
        "tense_agreement": share(sum(p["agrees"] for p in timed), len(timed)),
        "with_time_phrase": len(timed),
        "semantic_errors": share(sum(not p["sensible"] for _, p in good), len(good)),
        "novel": share(sum((t.lower() if lowercase else t) not in known for t, _ in good), len(good)),
        "examples_bad": [t for t, p in zip(texts, parsed) if p is None][:5],
    }


@torch.no_grad()
def continuation_logprobs(model, pairs, batch_size):
    """log p(rest | prefix) for each (prefix ids, rest ids), batched (rows padded on the right)."""
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        seqs = [p + r for p, r in batch]
        width = max(map(len, seqs))
        x = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        logits, _ = model(x[:, :-1], x[:, 1:].contiguous())
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(2, x[:, 1:, None])[..., 0]  # (B, width - 1)
        for row, (prefix, rest) in enumerate(batch):
            scores.append(logprobs[row, len(prefix) - 1 : len(prefix) - 1 + len(rest)].sum().item())
    return scores


def probe(model, tokenizer, config, train_lines):
    """Per tense, held-out statements scored after a time phrase of every tense: 12 x 12 preference counts."""
    rng = random.Random(config["seed"])
    known = set(train_lines)
    pairs, truth = [], []
    for t_index, tense in enumerate(TENSES):
        made = 0
        while made < config["probe_per_tense"]:
            subject, person, kind = rng.choice(grammar.SUBJECTS)
            verb, objects, who = rng.choice(grammar.VERBS)
            if kind not in who:
                continue
            phrase = rng.choice(ONLY[tense])
            form = rng.choice(["affirmative", "negative"])
            sentence = grammar.sentence(
                subject, person, verb, rng.choice(objects), tense, form, phrase, time_first=True
            )
            if sentence in known:
                continue  # held out: the model never saw this sentence
            rest = tokenizer.encode(sentence[len(phrase) :]) + [tokenizer.eot]  # ", the baby ate an apple." and the end
            for other in TENSES:
                lead = rng.choice(ONLY[other]) if other != tense else phrase
                pairs.append(([tokenizer.eot] + tokenizer.encode(lead[0].upper() + lead[1:]), rest))
            truth.append(t_index)
            made += 1
    scores = np.array(continuation_logprobs(model, pairs, config["batch_size"])).reshape(len(truth), len(TENSES))
    counts = np.zeros((len(TENSES), len(TENSES)), dtype=int)
    for t_index, row in zip(truth, scores):
        counts[t_index, int(row.argmax())] += 1
    return counts


def draw_probe(counts, path):
    plt = pyplot()
    if plt is None:
        return False
    shares = counts / counts.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(shares, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(TENSES)), TENSES, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(TENSES)), TENSES, fontsize=8)
    ax.set_xlabel("the tense whose time phrase the model prefers")
    ax.set_ylabel("the verb's tense")
    for i in range(len(TENSES)):
        for j in range(len(TENSES)):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    f"{shares[i, j]:.0%}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if shares[i, j] < 0.5 else "black",
                )
    ax.set_title("minimal pairs: which time phrase makes the sentence most likely")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def instruction_accuracy(model, tokenizer, conversations, tags):
    """
    Exact match on held-out conversations: each assistant turn is generated greedily after the conversation so
    far (the reference's earlier turns) and compared with the reference; a conversation counts when every turn
    matches. Overall and for each phrasing (tags' "phrasing": make_tense.py's "seen" and "held-out" families),
    per task and per tense asked for.
    """
    table = grammar.cores()
    # every assistant turn of every conversation, after the reference's turns before it, answered in one batch
    turns = [(c, i) for c, conv in enumerate(conversations) for i, m in enumerate(conv) if m["role"] == "assistant"]
    replies = dict(zip(turns, greedy_answers(model, tokenizer, [conversations[c][:i] for c, i in turns])))
    rows = []
    for c, (messages, tag) in enumerate(zip(conversations, tags)):
        # the conversation's first wrong turn, if any
        wrong = [i for i, m in enumerate(messages) if m["role"] == "assistant" and replies[c, i] != m["content"]]
        miss = None
        if wrong:
            i = wrong[0]
            miss = {"asked": messages[i - 1]["content"], "expected": messages[i]["content"], "got": replies[c, i]}
        task = tag.get("task", "all")
        tense = instructions.tense_asked(messages, table) if task != "off-task" else "other"
        family = f"{task}: {tag.get('family', '')}"
        rows.append(
            {"phrasing": tag.get("phrasing", "all"), "task": task, "tense": tense, "family": family, "miss": miss}
        )

    def summary(rows):
        def share(key):
            groups = sorted({r[key] for r in rows} - {"other"})
            return {g: float(np.mean([not r["miss"] for r in rows if r[key] == g])) for g in groups}

        return {
            "conversations": len(rows),
            "exact_match": float(np.mean([not r["miss"] for r in rows])),
            "exact_match_per_task": share("task"),
            "exact_match_per_tense": share("tense"),
            "exact_match_per_family": share("family"),
            "examples_wrong": [r["miss"] for r in rows if r["miss"]][:10],
        }

    phrasings = sorted({r["phrasing"] for r in rows}, key=lambda p: (p != "seen", p))
    return {**summary(rows), "by_phrasing": {p: summary([r for r in rows if r["phrasing"] == p]) for p in phrasings}}


def chat_report(model, tokenizer, checkpoint, data_dir, val, meta, config, device):
    """A chat model's exact match, beside the same for the model it was fine-tuned from (template alone)."""
    conversations = decode_conversations(tokenizer, val)
    tags = read_val_tags(data_dir, meta, len(conversations))
    chosen = sorted(
        random.Random(config["seed"]).sample(range(len(conversations)), min(config["chat_samples"], len(conversations)))
    )
    conversations, tags = [conversations[i] for i in chosen], [tags[i] for i in chosen]
    report = {"chat": instruction_accuracy(model, tokenizer, conversations, tags)}
    if any(t.get("phrasing") == "held-out" for t in tags):
        report["held_out_families"] = instructions.held_out_frames()
    base = checkpoint.get("base") or ""
    if base.endswith(".pth") and os.path.isfile(base):
        # the base, with rows for the chat tokens made as fine-tuning made them
        settings = {"data_dir": data_dir, "block_size": model.config.block_size, "dropout": 0.0}
        gpt_config, state, _ = fine_tuning_start(base, settings, meta, checkpoint["tokenizer_meta"], lambda *_: None)
        before = GPT(gpt_config).to(device).eval()
        before.load_state_dict(state)
        report["chat_before"] = {"ckpt": base, **instruction_accuracy(before, tokenizer, conversations, tags)}
    return report


def main():
    config = parse_config(DEFAULTS, sys.argv[1:], allow_files=False, doc=__doc__)
    check_options(config)
    device = pick_device(config["device"])
    model, tokenizer, checkpoint = load_model(config["ckpt"], device)
    data_dir = config["data_dir"] or checkpoint.get("train_config", {}).get("data_dir") or "data"
    val, meta = load_split(data_dir, "val", checkpoint["tokenizer_meta"])
    torch.manual_seed(config["seed"])
    report, notes = {"ckpt": config["ckpt"], "data_dir": data_dir, "tokenizer": tokenizer.name}, []
    if meta.get("chat"):  # a chat model: does it answer right? (its text's bits per byte mean little)
        report.update(chat_report(model, tokenizer, checkpoint, data_dir, val, meta, config, device))
    else:
        report.update(held_out_loss(model, val, meta, tokenizer, config["batch_size"]))
        tense_report(report, model, tokenizer, checkpoint, data_dir, val, config, device, notes)
    show(report, config, notes)


def tense_report(report, model, tokenizer, checkpoint, data_dir, val, config, device, notes):
    """A model of tense.txt: the grammar of its samples, and the minimal-pairs probe (added to report)."""
    val_lines = decode_examples(tokenizer, val)
    lowercase = tokenizer.name == "word"  # the word tokenizer lowercases its text
    table = grammar.cores(lowercase)
    parses = sum(grammar.parse(line, table, lowercase) is not None for line in val_lines[:500])
    if val_lines and parses >= 0.9 * min(len(val_lines), 500):
        train_lines = decode_examples(tokenizer, load_split(data_dir, "train", checkpoint["tokenizer_meta"])[0])
        unprompted, after_subject = sample_sentences(model, tokenizer, config, device)
        report.update(grammar_check(unprompted + after_subject, train_lines, table, lowercase))
        timed, after_time = time_phrase_check(model, tokenizer, config, device, table, lowercase)
        report.update(timed)
        # the headline: the share of correct sentences, the worst of the three ways of asking
        kinds = {"unconditional": unprompted, "after a subject": after_subject, "after a time phrase": after_time}
        report["correct_by_prompt"] = {kind: correctness(texts, table, lowercase) for kind, texts in kinds.items()}
        report["correct_sentences"] = min(part["correct"] for part in report["correct_by_prompt"].values())
        counts = probe(model, tokenizer, config, train_lines)
        per_tense = counts.diagonal() / counts.sum(axis=1)
        report["probe_accuracy"] = float(per_tense.mean())
        report["probe_per_tense"] = {t: float(a) for t, a in zip(TENSES, per_tense)}
        report["probe_chance"] = 1 / len(TENSES)
        report["probe_counts"] = counts.tolist()
        picture = config["picture"] or os.path.join(os.path.dirname(config["ckpt"]) or ".", "probe.png")
        if draw_probe(counts, picture):
            report["picture"] = picture
        else:
            notes.append("no picture of the probe: pip install matplotlib")
    else:
        notes.append(
            "the grammar check and the probe are for models trained on tense.txt; "
            f"{data_dir}/'s val text is not its sentences ({parses} of {min(len(val_lines), 500)} parse), "
            "so they are skipped"
        )


def show(report, config, notes):
    """The report as text (or JSON), then the notes on stderr."""
    if config["json"]:
        print(json.dumps(report, indent=1))
    elif "chat" in report:
        show_chat(report)
    else:
        print(
            f"{config['ckpt']} on {report['data_dir']}/ val ({report['val_tokens']:,} tokens, "
            f"{report['val_bytes']:,} bytes): loss {report['val_loss']:.4f}, "
            f"perplexity {report['val_perplexity']:.3f}, {report['bits_per_byte']:.4f} bits per byte"
        )
        if "correct_sentences" in report:
            print(
                f"correct sentences {report['correct_sentences']:.1%} (the worst of three ways to sample, at "
                f"temperature {config['temperature']}: a sentence is correct when it parses, agrees with its time "
                "phrase and its subject may do its verb)"
            )
            print(f"  {'':26} {'samples':>8} {'correct':>8} {'grammatical':>12} {'agrees':>7} {'who-what ok':>12}")
            for kind, part in report["correct_by_prompt"].items():
                print(
                    f"  {kind:26} {part['samples']:>8,} {part['correct']:>8.1%} {part['grammatical']:>12.1%} "
                    f"{part['agrees']:>7.1%} {part['sensible']:>12.1%}"
                )
            for kind, part in report["correct_by_prompt"].items():
                for miss in part["examples_wrong"][:2]:
                    print(f"  wrong, {kind}: {miss['text']!r} ({miss['why']})")
        if "grammatical" in report:
            print(
                f"{report['samples']} samples at temperature {config['temperature']}: "
                f"grammatical {report['grammatical']:.1%}, tense agreement {report['tense_agreement']:.1%} "
                f"(of {report['with_time_phrase']} with a time phrase), "
                f"who-does-what errors {report['semantic_errors']:.1%}, novel {report['novel']:.1%} "
                "(of the grammatical ones)"
            )
            for bad in report["examples_bad"][:3]:
                print(f"  not grammatical: {bad!r}")
            worst = min(report["time_prompt_per_tense"], key=report["time_prompt_per_tense"].get)
            print(
                f'{report["time_prompts"]} prompts that open with a time phrase ("Yesterday, the baby"): '
                f"grammatical, in its tense {report['time_prompt_agreement']:.1%}"
                f" (worst: {worst}, {report['time_prompt_per_tense'][worst]:.1%})"
            )
            for bad in report["examples_bad_time_prompt"][:3]:
                print(f"  not in its tense: {bad!r}")
            print(
                f"minimal-pairs probe, {config['probe_per_tense']} held-out statements per tense "
                f"(chance {1 / len(TENSES):.1%}):"
            )
            for tense, accuracy in report["probe_per_tense"].items():
                print(f"  {tense:28} {accuracy:7.1%}")
            print(f"  {'mean':28} {report['probe_accuracy']:7.1%}")
            if "picture" in report:
                print(f"picture: {report['picture']}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def show_chat(report):
    runs = [("fine-tuned", report["chat"])] + ([("before", report["chat_before"])] if "chat_before" in report else [])
    phrasings = list(report["chat"]["by_phrasing"])
    n = report["chat"]["conversations"]
    print(f"exact match on {n} held-out conversations (greedy; every turn must match; off-task: the fixed reply):")
    if "held_out_families" in report:
        print("  seen: held-out sentences worded as in training; held-out: worded by families training never saw")
    columns = [(name, p) for name, _ in runs for p in phrasings]
    print(f"  {'':28}" + "".join(f"{name:>12}" for name, _ in columns))
    print(f"  {'':28}" + "".join(f"{p:>12}" for _, p in columns))
    by = {name: run["by_phrasing"] for name, run in runs}
    for key in ("exact_match_per_task", "exact_match_per_tense"):
        for k in report["chat"][key]:
            print(f"  {k:28}" + "".join(cell(by[name][p][key].get(k)) for name, p in columns))
    print(f"  {'all':28}" + "".join(cell(by[name][p]["exact_match"]) for name, p in columns))
    for p in phrasings:
        for miss in report["chat"]["by_phrasing"][p]["examples_wrong"][:3]:
            print(f"  missed ({p}): {miss['asked']!r} -> {miss['got']!r} (expected {miss['expected']!r})")
    for task, frames in report.get("held_out_families", {}).items():
        print(f"  held-out families, {task}: " + " | ".join(frames))


def cell(value):
    return f"{'-':>12}" if value is None else f"{value:12.1%}"


if __name__ == "__main__":
    main_guard(main)
