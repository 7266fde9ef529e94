"""Chat fine-tuning: the JSONL reader, the template and its trained-token marks, batches of whole
conversations, fine-tuning from a checkpoint, LoRA, GPT-2 from the hub's cache, sample.py --chat."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import ROOT, fails, fine_tune_chat, run_script, talk, torchrun, write_jsonl

from model import GPT, IGNORE, GPTConfig
from tensegpt import instructions, lora
from tensegpt import tokenizer as tok
from tensegpt.chat import CHAT_TOKENS, ChatTokenizer, decode_conversations, read_records
from tensegpt.common import UserError
from tensegpt.packing import ChatBatches

TINY = os.path.join(ROOT, "config", "tiny.py")


@pytest.fixture(scope="module")
def chat_run(tiny_run, tmp_path_factory):
    """The tiny run's model fine-tuned a few steps on tense instructions (its vocabulary + chat tokens)."""
    folder = tmp_path_factory.mktemp("chat_run")
    fine_tune_chat(folder, tiny_run / "out" / "trained.pth", "--max_iters=8", "--eval_interval=4", "--block_size=32")
    return folder


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "chat.jsonl line 2 is not JSON (Expecting property name enclosed in double quotes)"),
        ('{"text": "hello"}', 'chat.jsonl line 2 has no "messages" list'),
        ('{"messages": [{"role": "user"}]}', 'chat.jsonl line 2: message 1 needs a "role" and a "content"'),
        (
            '{"messages": [{"role": "robot", "content": "hi"}]}',
            "chat.jsonl line 2: message 1 has role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "chat.jsonl line 2: the conversation ends with a user",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
            "chat.jsonl line 2: assistant message 2 is empty",
        ),
    ],
)
def test_a_bad_jsonl_line_is_one_line_that_names_it(tmp_path, line, problem):
    good = json.dumps({"messages": talk("Hi", "Hello.")})
    (tmp_path / "chat.jsonl").write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
    message = fails("prepare.py", "--input=chat.jsonl", cwd=tmp_path)
    assert message.startswith(f"error: {problem}"), message
    assert not (tmp_path / "data").exists() or not os.listdir(tmp_path / "data")


def test_a_byte_order_mark_before_the_first_conversation_is_not_text(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": talk("Hi", "Hello.")}).encode() + b"\n")
    assert read_records(str(path)) == [(talk("Hi", "Hello."), {})]


def test_random_json_through_the_reader_is_read_or_refused_in_one_line(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["messages", "role", "content", "user", "assistant", "system"]),
                children,
                max_size=3,
            )
        ),
        max_leaves=8,
    )

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(json_values)
    def check(value):
        path = tmp_path / "random.jsonl"
        path.write_text(json.dumps(value) + "\n", encoding="utf-8")
        try:
            records = read_records(str(path))
        except UserError as e:
            assert "\n" not in str(e) and str(path) in str(e)
        else:
            assert records[0][0][-1]["role"] == "assistant"

    check()


# ----------------------------------------------------------------------------- the template


def test_the_template_marks_the_answers_and_typed_special_tokens_stay_text():
    tokenizer = ChatTokenizer(tok.GPT2())
    messages = [{"role": "system", "content": "Be brief."}, *talk("Say <|user|> and <|end|>", "Done.")]
    ids, trained = tokenizer.encode_conversation(messages)
    specials = [i for i in ids if i >= tok.GPT2().vocab_size]
    assert specials == [
        tokenizer.system,
        tokenizer.end,
        tokenizer.user,
        tokenizer.end,
        tokenizer.assistant,
        tokenizer.end,
    ]
    answer = tokenizer.encode("Done.")
    assert [i for i, t in zip(ids, trained) if t] == answer + [tokenizer.end]  # the answer and the <|end|> closing it
    assert decode_conversations(tokenizer, ids) == [messages]


@pytest.mark.parametrize("options", [[], ["--full_vocab=True"], ["--tokenizer=char"], ["--tokenizer=word"]])
def test_every_tokenizer_gets_the_chat_tokens(tmp_path, options):
    write_jsonl(tmp_path / "chat.jsonl", [talk(f"Say {i}.", f"I say {i}.") for i in range(20)])
    run_script("prepare.py", "--input=chat.jsonl", *options, cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    tokenizer = tok.from_meta(meta)
    assert meta["chat"] and meta["chat_tokens"] == CHAT_TOKENS
    assert tokenizer.vocab_size == meta["vocab_size"] == tokenizer.base.vocab_size + 4
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    marks = np.fromfile(tmp_path / "data" / "train.mask.bin", dtype=np.uint8)
    assert len(ids) == len(marks) == meta["train_tokens"] and set(ids[marks == 1]) >= {tokenizer.end}
    conversations = decode_conversations(tokenizer, ids)
    assert len(conversations) == meta["train_conversations"] and conversations[0][0]["role"] == "user"


def test_vocab_from_speaks_the_base_models_tokens(tiny_run, tmp_path):
    write_jsonl(
        tmp_path / "chat.jsonl",
        [talk("Put it in the past.", "The baby ate an apple.")] * 4 + [talk("Bashfully?", "Grinned.")] * 4,
    )
    run_script("prepare.py", "--input=chat.jsonl", f"--vocab_from={tiny_run / 'data'}", cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    base = json.loads((tiny_run / "data" / "meta.json").read_text())
    assert meta["gpt2_ids"] == base["gpt2_ids"] and meta["vocab_size"] == base["vocab_size"] + 4


def test_batches_hold_whole_conversations_and_count_the_answers_only():
    tokenizer = ChatTokenizer(tok.Char.from_counts({c: 1 for c in "abcdefgh ."}))
    conversations = [talk("a" * n, "b" * (n % 5 + 1)) for n in range(1, 30)]
    pairs = [tokenizer.encode_conversation(c) for c in conversations]
    ids = np.array([i for p in pairs for i in p[0]])
    trained = np.array([t for p in pairs for t in p[1]])
    batches = ChatBatches((ids, trained), batch_size=8, block_size=24, device="cpu", seed=0)
    assert batches.too_long == sum(len(p[0]) > 25 for p in pairs) > 0  # left out, and counted
    whole = {tuple(p[0]) for p in pairs}
    for x, y in batches.step():
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            row = row_x + [row_y[-1] if row_y[-1] != IGNORE else tokenizer.eot]
            starts = [i for i, t in enumerate(row) if t == tokenizer.eot] + [len(row)]
            pieces = [tuple(row[s:e]) for s, e in zip(starts, starts[1:])]
            assert all(p in whole or set(p) == {tokenizer.eot} for p in pieces)  # never a conversation cut
            for target in row_y:  # a target is kept only where the answer is
                assert target == IGNORE or target in tokenizer.encode("b") + [tokenizer.end]


# ----------------------------------------------------------------------------- fine-tuning and talking


def test_fine_tuning_starts_from_the_checkpoint_and_answers_in_the_terminal(chat_run, tiny_run):
    saved = torch.load(chat_run / "out-chat" / "last.pth", weights_only=True)
    assert saved["base"] == str(tiny_run / "out" / "trained.pth") and saved["iter_num"] == 8
    assert saved["tokenizer_meta"]["chat_tokens"] == CHAT_TOKENS
    one = run_script(
        "sample.py",
        "--ckpt=out-chat/trained.pth",
        "--chat",
        "--start=Negate: The baby is sleeping.",
        "--greedy",
        cwd=chat_run,
    )
    assert one.stdout.count("\n") == 1  # one reply, and the script exits
    talked = run_script(
        "sample.py",
        "--ckpt=out-chat/trained.pth",
        "--chat",
        "--greedy",
        cwd=chat_run,
        input="Negate: The baby is sleeping.\nAnd in the past simple?\n",
    )
    assert talked.stdout.count("model> ") == 2
    # the model as its own draft: the same greedy reply, every drafted token kept
    drafted = run_script(
        "sample.py", "--ckpt=out-chat/trained.pth", "--chat", "--start=Negate: The baby is sleeping.",
        "--greedy", "--draft=out-chat/trained.pth", "--draft_precision=float32", cwd=chat_run,
    )  # fmt: skip
    assert drafted.stdout == one.stdout and "(100%)" in drafted.stderr
    refused = fails("sample.py", f"--ckpt={tiny_run / 'out' / 'trained.pth'}", "--chat", "--start=Hi", cwd=chat_run)
    assert "has no chat tokens" in refused


def test_an_answer_without_sampling_settings_is_the_greedy_one():
    """eval.py's exact match asks for answers with no settings: the greedy text, whatever the seed."""
    from tensegpt.decoding import answer

    tokenizer = ChatTokenizer(tok.Char.from_counts({c: 1 for c in "abcdefgh ."}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    model.eval()
    messages = [{"role": "user", "content": "abc def"}]
    replies = set()
    for seed in range(5):
        torch.manual_seed(seed)
        replies.add(answer(model, tokenizer, messages, max_new_tokens=12))
    idx = torch.tensor([tokenizer.prompt(messages)])
    greedy = model.generate(idx, 12, greedy=True, stop_token=tokenizer.end)[0, idx.size(1) :].tolist()
    greedy = greedy[: greedy.index(tokenizer.end)] if tokenizer.end in greedy else greedy
    assert replies == {tokenizer.decode(greedy)}
    # asked to sample, it samples: at a high temperature the seeds give different replies
    sampled = set()
    for seed in range(5):
        torch.manual_seed(seed)
        sampled.add(answer(model, tokenizer, messages, max_new_tokens=12, greedy=False, temperature=2.0))
    assert len(sampled) > 1


def test_eval_reports_exact_match_beside_the_model_before_fine_tuning(chat_run):
    out = run_script("eval.py", "--ckpt=out-chat/trained.pth", "--json=True", "--chat_samples=20", cwd=chat_run)
    report = json.loads(out.stdout)
    assert report["chat"]["conversations"] == report["chat_before"]["conversations"] == 20
    assert set(report["chat"]["exact_match_per_task"]) <= set(instructions.TASKS)
    # held-out sentences worded as in training, and worded by the held-out families, side by side
    groups = report["chat"]["by_phrasing"]
    assert list(groups) == ["seen", "held-out"] and sum(g["conversations"] for g in groups.values()) == 20
    assert list(report["chat_before"]["by_phrasing"]) == ["seen", "held-out"]
    assert "convert {x} to the {tense}" in report["held_out_families"]["rewrite"]
    assert 0.0 <= report["chat_before"]["exact_match"] <= 1.0
    # the tiny model before fine-tuning misses every one: each miss names the question, answer and reply
    misses = report["chat_before"]["examples_wrong"]
    assert report["chat_before"]["exact_match"] == 0.0 and len(misses) == 10
    assert all(m["expected"] != m["got"] and m["asked"] for m in misses)
    shown = run_script("eval.py", "--ckpt=out-chat/trained.pth", "--chat_samples=20", cwd=chat_run).stdout
    assert "held-out families, rewrite: convert {x} to the {tense} | " in shown
    assert shown.count("seen") >= 2 and "held-out" in shown.splitlines()[3]


def test_prepare_keeps_each_val_conversations_tags_for_eval(tmp_path):
    line = lambda tags: json.dumps({"messages": talk("a", "b"), **tags})
    lines = [line({"task": "x", "phrasing": "seen"}), line({"task": "y", "phrasing": "held-out", "n": [1]})]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.jsonl").write_text(line({}) + "\n" + line({}) + "\n")
    run_script(
        "prepare.py", "--input=train.jsonl", "--val_input=val.jsonl", "--tokenizer=char", "--out_dir=d", cwd=tmp_path
    )
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["val_tags"] == "val.tags.jsonl"
    # plain values only: a list is not a tag
    tags = [json.loads(line) for line in (tmp_path / "d" / "val.tags.jsonl").read_text().splitlines()]
    assert tags == [{"task": "x", "phrasing": "seen"}, {"task": "y", "phrasing": "held-out"}]
    # a file without tags records none
    run_script(
        "prepare.py", "--input=train.jsonl", "--val_input=train.jsonl", "--tokenizer=char", "--out_dir=d", cwd=tmp_path
    )
    assert "val_tags" not in json.loads((tmp_path / "d" / "meta.json").read_text())


def test_chat_data_and_plain_data_are_not_mixed_up(chat_run, tiny_run):
    assert "holds conversations" in fails("train.py", TINY, "--data_dir=data-chat", "--out_dir=o1", cwd=chat_run)
    plain = fails("train.py", TINY, "--chat=True", f"--data_dir={tiny_run / 'data'}", "--out_dir=o2", cwd=chat_run)
    assert "--chat=True trains on conversations" in plain


def test_fine_tuning_data_of_another_vocabulary_is_refused(chat_run, tiny_run, tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [talk(f"Zebra {i}?", f"Quokka {i}.") for i in range(10)])
    run_script("prepare.py", "--input=chat.jsonl", "--out_dir=other", cwd=tmp_path)  # its own vocabulary
    message = fails(
        "train.py",
        TINY,
        "--chat=True",
        f"--init_from={tiny_run / 'out' / 'trained.pth'}",
        "--data_dir=other",
        "--out_dir=o",
        cwd=tmp_path,
    )
    assert "does not speak" in message and "--vocab_from=" in message


def test_a_mark_file_that_does_not_match_its_ids_is_one_line(chat_run, tmp_path):
    import shutil

    shutil.copytree(chat_run / "data-chat", tmp_path / "data-chat")
    with open(tmp_path / "data-chat" / "train.mask.bin", "ab") as f:
        f.write(b"\x01")
    message = fails("train.py", TINY, "--chat=True", "--data_dir=data-chat", "--out_dir=o", cwd=tmp_path)
    assert message.startswith("error: data-chat/train.mask.bin has ") and "run python prepare.py again" in message


def test_val_tags_that_do_not_match_the_val_split_are_one_line(chat_run, tmp_path):
    import shutil

    shutil.copytree(chat_run / "data-chat", tmp_path / "data-chat")
    tags = tmp_path / "data-chat" / "val.tags.jsonl"
    tags.write_text("".join(tags.read_text().splitlines(keepends=True)[1:]))
    ckpt = chat_run / "out-chat" / "trained.pth"
    message = fails("eval.py", f"--ckpt={ckpt}", "--data_dir=data-chat", "--chat_samples=2", cwd=tmp_path)
    assert "val.tags.jsonl tags" in message and "run prepare.py again" in message


# ----------------------------------------------------------------------------- LoRA


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True))


ADAPTERS = {"rank": 4, "alpha": 8.0, "targets": list(lora.TARGETS)}


def test_lora_at_its_start_is_exactly_the_base_and_only_adapters_learn():
    base, model = small_model(), small_model()
    lora.add_adapters(model, ADAPTERS)
    x = torch.randint(0, 64, (3, 16))
    assert torch.equal(base(x, x)[0], model(x, x)[0])
    model(x, x)[1].backward()
    learned = {name for name, p in model.named_parameters() if p.grad is not None}
    assert learned and all(name.endswith(("lora_A", "lora_B")) for name in learned)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)


def test_merged_adapters_give_the_logits_of_base_plus_adapters():
    model = lora.add_adapters(small_model(), ADAPTERS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)  # as if trained
    x = torch.randint(0, 64, (3, 16))
    with_adapters = model(x, x)[0]
    merged = lora.merge(model)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(merged(x, x)[0], with_adapters, atol=1e-5)


@pytest.mark.parametrize(
    "options,problem",
    [
        (["--lora_rank=-1"], "--lora_rank must be between 1 and the width n_embd - 1 = 31, got -1"),
        (["--lora_rank=32"], "--lora_rank must be between 1 and the width n_embd - 1 = 31, got 32"),
        (["--lora_rank=4", "--lora_targets=wpe"], "--lora_targets names the matrices to adapt"),
    ],
)
def test_impossible_lora_settings_are_refused(tiny_run, tmp_path, options, problem):
    message = fails("train.py", TINY, f"--data_dir={tiny_run / 'data'}", "--out_dir=o", *options, cwd=tmp_path)
    assert problem in message


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_lora_fine_tuning_saves_a_checkpoint_that_every_script_loads(chat_run, tiny_run):
    base = tiny_run / "out" / "trained.pth"
    out = run_script(
        "train.py",
        TINY,
        "--chat=True",
        f"--init_from={base}",
        "--data_dir=data-chat",
        "--out_dir=out-lora",
        "--block_size=32",
        "--max_iters=4",
        "--eval_interval=4",
        "--lora_rank=4",
        cwd=chat_run,
    )
    assert "LoRA rank 4" in out.stdout and "parameters (" in out.stdout
    saved = torch.load(chat_run / "out-lora" / "trained.pth", weights_only=True)
    assert saved["lora"]["rank"] == 4 and saved["lora"]["base"] == str(base)
    assert any(key.endswith("lora_B") for key in saved["model"])
    run_script("sample.py", "--ckpt=out-lora/trained.pth", "--chat", "--start=Negate: It is.", cwd=chat_run)
    run_script("eval.py", "--ckpt=out-lora/trained.pth", "--chat_samples=4", cwd=chat_run)
    resumed = run_script(
        "train.py",
        TINY,
        "--chat=True",
        "--data_dir=data-chat",
        "--out_dir=out-lora",
        "--block_size=32",
        "--max_iters=6",
        "--eval_interval=4",
        "--lora_rank=4",
        "--init_from=resume",
        cwd=chat_run,
    )
    assert "resuming out-lora/last.pth at iteration 4" in resumed.stdout


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_lora_under_ddp_trains_like_one_process(chat_run, tiny_run):
    args = [
        TINY,
        "--chat=True",
        f"--init_from={tiny_run / 'out' / 'trained.pth'}",
        "--data_dir=data-chat",
        "--block_size=32",
        "--max_iters=4",
        "--eval_interval=4",
        "--log_interval=1",
        "--lora_rank=4",
        "--grad_accum=2",
    ]
    run_script("train.py", *args, "--out_dir=one", cwd=chat_run)
    torchrun(*args, "--out_dir=two", cwd=chat_run)
    from helpers import losses

    one, two = losses(chat_run / "one"), losses(chat_run / "two")
    assert len(one) == len(two) == 4 and np.allclose(one, two, atol=1e-4)


# ----------------------------------------------------------------------------- GPT-2 from the hub


@pytest.mark.slow  # the quick run leaves it out; CI runs it
def test_gpt2_by_name_comes_from_the_hub_cache_when_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("huggingface_hub")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    transformers.GPT2LMHeadModel(config).save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    from helpers import tense_lines

    (tmp_path / "in.txt").write_text("\n".join(tense_lines(300)) + "\n", encoding="utf-8")
    run_script("prepare.py", "--input=in.txt", "--full_vocab=True", cwd=tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = run_script("train.py", TINY, "--init_from=gpt2", "--max_iters=2", "--eval_interval=2", cwd=tmp_path, env=env)
    assert "initialising from the weights" in out.stdout and "n_embd 32" in out.stdout
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    message = fails_with_env("train.py", TINY, "--init_from=gpt2-medium", "--out_dir=o", cwd=tmp_path, env=env)
    assert "GPT-2 weights 'gpt2-medium' are neither in the Hugging Face cache nor downloadable" in message


def fails_with_env(*args, cwd, env):
    result = run_script(*args, cwd=cwd, check=False, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_the_chat_history_drops_its_oldest_turns_whole_to_fit_the_context():
    from tensegpt.sample_setup import fit_history

    tokenizer = ChatTokenizer(tok.Char.from_counts({c: 1 for c in "abcdefghij ?."}))
    system = [{"role": "system", "content": "abc"}]
    history = system + talk("aaaa?", "bbbb.") + talk("cccc?", "dddd.") + [{"role": "user", "content": "eeee?"}]
    kept = fit_history(tokenizer, history, room=len(tokenizer.prompt(system + history[3:])))
    assert kept == system + history[3:]  # the first question and its answer left together; the system stays
    assert fit_history(tokenizer, history, room=10**6) == history


def test_answers_in_a_batch_are_the_answers_one_at_a_time():
    """eval.py's exact match answers every turn in one batch (greedy_answers): the texts answer() gives alone."""
    from tensegpt.decoding import answer, greedy_answers

    tokenizer = ChatTokenizer(tok.Char.from_counts({c: 1 for c in "abcdefgh ."}))
    torch.manual_seed(2)  # a random model whose answers differ in text and length
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    texts = ["abc def", "h", "gg. a b c d e f", "da", "bad cafe. fed", "e e e"]
    conversations = [[{"role": "user", "content": t}] for t in texts]
    conversations.append([*conversations[0], {"role": "assistant", "content": "ace"}, {"role": "user", "content": "b"}])
    alone = [answer(model, tokenizer, messages, max_new_tokens=12) for messages in conversations]
    # 3 rows for 7 conversations: some join as others leave
    assert greedy_answers(model, tokenizer, conversations, max_new_tokens=12, max_batch=3) == alone
    assert len(set(alone)) > 3 and max(map(len, alone)) > 3
