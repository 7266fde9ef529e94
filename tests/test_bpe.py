"""
A BPE learned from the text (prepare.py --tokenizer=bpe): the trainer against the plain
algorithm and against Hugging Face tokenizers' BpeTrainer, round trips on any text, and
every stage with a BPE-tokenized model.
"""

import json
import os

import hypothesis
import pytest
import torch
from helpers import ROOT, fails, run_script, tense_lines
from hypothesis import strategies as st

from tensegpt import bpe
from tensegpt.checkpoint import load_model
from tensegpt.hf_tokenizer import bpe_tokenizer_json
from tensegpt.tokenizer import BPE, from_meta

PROSE = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' So she was "
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the daisies."
)
TEXTS = [*tense_lines(400), PROSE, "naïve café, Zürich, 東京, 東京タワー, emoji 🙂🚀🙂, tabs\tand  spaces  "]


@pytest.fixture(scope="module")
def learned():
    return BPE.learn(bpe.pieces(TEXTS), 700)


@pytest.mark.parametrize("texts", [["aaabdaaabac", "aaab aaab abab"], TEXTS[:50], [PROSE, PROSE[::-1]]])
def test_the_trainer_learns_the_plain_algorithms_merges(texts):
    counts = bpe.pieces(texts)
    assert bpe.train(counts, 300) == bpe.reference(counts, 300)


def test_ties_go_to_the_smallest_pair_and_a_pair_seen_once_is_not_merged():
    # pieces "ab", " cd", " ab", " cd", " ef": (32, 99) " c", (97, 98) "ab" and (99, 100) "cd" twice each, the
    # smallest first; then " c" + "d" twice; " ab", " e" and "ef" once each: never merged
    assert bpe.train(bpe.pieces(["ab cd ab cd ef"]), 10) == [(32, 99), (97, 98), (256, 100)]


def test_round_trips_seen_and_unseen_text(learned):
    for text in [*TEXTS, "Zebras quietly juggle 42 pineapples.", "", "\n\n  \t"]:
        assert learned.decode(learned.encode(text)) == text
    # the tokens it learned shorten the text it learned from
    assert len(learned.encode(PROSE)) < 0.5 * len(PROSE.encode())


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(max_size=80))
def test_any_unicode_round_trips(text):
    tokenizer = BPE.learn(bpe.pieces(TEXTS[:20]), 400)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_it_rebuilds_from_its_meta_and_a_damaged_one_is_refused(learned):
    again = from_meta(json.loads(json.dumps(learned.meta())))
    assert again.encode(PROSE) == learned.encode(PROSE) and again.eot == learned.eot == learned.vocab_size - 1
    with pytest.raises(ValueError, match="starts with the 256 single bytes"):
        BPE([b"a", b"b"])


def test_compression_and_merges_beside_hugging_faces_bpe_trainer(learned):
    tokenizers = pytest.importorskip("tokenizers")
    # the same input and pre-tokenization: GPT-2's split, bytes as characters; the same vocabulary size
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=learned.vocab_size - 1, min_frequency=2, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    model.train_from_iterator(TEXTS, trainer)
    ours = sum(len(learned.encode(t)) for t in TEXTS)
    theirs = sum(len(model.encode(t).ids) for t in TEXTS)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_the_exported_tokenizer_gives_the_same_ids_in_transformers(learned, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json(learned.meta())))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS[:50], PROSE, "Zebras quietly juggle 42 pineapples 🙂"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == learned.encode(text), text


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """2,000 tense.txt lines prepared with a learned BPE of 600 tokens, and a tiny model trained on them."""
    folder = tmp_path_factory.mktemp("bpe_run")
    (folder / "corpus.txt").write_text("\n".join(tense_lines(2000)) + "\n", encoding="utf-8")
    out = run_script("prepare.py", "--input=corpus.txt", "--tokenizer=bpe", "--vocab_size=600", cwd=folder).stdout
    assert "bpe: learned" in out and "tokenizer bpe" in out
    run_script("train.py", os.path.join(ROOT, "config", "tiny.py"), "--out_dir=out", "--max_iters=60", cwd=folder)
    return folder


def test_every_stage_works_with_a_bpe_model(bpe_run, tmp_path):
    ckpt = bpe_run / "out" / "trained.pth"
    model, tokenizer, _ = load_model(str(ckpt))
    assert tokenizer.name == "bpe"
    text = run_script("sample.py", f"--ckpt={ckpt}", "--start=The baby", "--greedy", "--num_samples=1",
                      "--max_new_tokens=12", cwd=bpe_run).stdout  # fmt: skip
    assert text.startswith("The baby")
    report = json.loads(run_script("eval.py", f"--ckpt={ckpt}", "--num_samples=10", "--time_prompts=12",
                                   "--probe_per_tense=1", "--json=True", cwd=bpe_run).stdout)  # fmt: skip
    assert report["tokenizer"] == "bpe" and 0 < report["bits_per_byte"] < 8
    run_script("export.py", f"--ckpt={ckpt}", "--out=hf", cwd=tmp_path)
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tokenizer("Yesterday, the baby slept.", add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode("Yesterday, the baby slept.")
    with torch.no_grad():
        ours = model(torch.tensor([ids]), logits_at=torch.arange(len(ids)))[0][:, : tokenizer.vocab_size]
        assert torch.allclose(hf_model(torch.tensor([ids])).logits[0], ours, atol=1e-4)
    # GGUF: llama.cpp tokenizes as the project does
    llama_cpp = pytest.importorskip("llama_cpp")
    run_script("export.py", f"--ckpt={ckpt}", "--format=gguf", "--outtype=f32", "--out=m.gguf", cwd=tmp_path)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, n_threads=1)
    for line in tense_lines(20):
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == tokenizer.encode(line)


def test_the_engine_serves_a_bpe_model(bpe_run):
    from tensegpt.model_check import check_engine

    check_engine(load_model(str(bpe_run / "out" / "trained.pth"))[0])


def test_bad_bpe_settings_are_one_line_errors(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(tense_lines(50)) + "\n")
    assert fails("prepare.py", "--input=t.txt", "--tokenizer=bpe", "--vocab_size=100", cwd=tmp_path) == (
        "error: --vocab_size must be between 258 and 65536 (256 bytes and end-of-text come first), got 100"
    )
    assert fails("prepare.py", "--input=t.txt", "--split_pattern=\\w+", cwd=tmp_path) == (
        "error: --split_pattern applies to --tokenizer=bpe only (the others split as they were made to)"
    )
    assert fails("prepare.py", "--input=t.txt", "--tokenizer=bpe", "--split_pattern=(", cwd=tmp_path).startswith(
        "error: --split_pattern='(' is not a regular expression"
    )


def test_a_split_pattern_of_its_own_exports_to_transformers_and_is_refused_by_gguf(tmp_path):
    transformers = pytest.importorskip("transformers")
    pattern = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]+|\s+"
    tokenizer = BPE.learn(bpe.pieces(TEXTS, pattern), 500, pattern)
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json(tokenizer.meta())))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS[:30], PROSE, "in 1865, 42 rabbits"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
    from tensegpt.common import UserError
    from tensegpt.gguf_export import write_gguf

    with pytest.raises(UserError, match="a --split_pattern of your own has none"):
        write_gguf(str(tmp_path / "m.gguf"), {}, {}, bpe_tokenizer_json(tokenizer.meta()), {}, "f32", "m")


def test_chat_fine_tuning_data_takes_a_bpe_and_exports_its_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_script("make_tense.py", "--task=chat", "--n=200", cwd=tmp_path)
    run_script("prepare.py", "--input=tense_chat.jsonl", "--val_input=tense_chat_val.jsonl", "--tokenizer=bpe",
               "--vocab_size=500", "--out_dir=data-chat", cwd=tmp_path)  # fmt: skip
    run_script("train.py", os.path.join(ROOT, "config", "tiny.py"), "--chat=True", "--data_dir=data-chat",
               "--out_dir=out-chat", "--max_iters=4", "--eval_interval=4", "--eval_iters=1", cwd=tmp_path)  # fmt: skip
    tokenizer = load_model(str(tmp_path / "out-chat" / "trained.pth"))[1]
    assert tokenizer.base.name == "bpe"
    run_script("export.py", "--ckpt=out-chat/trained.pth", "--out=hf", cwd=tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [{"role": "user", "content": "Negate: The baby is sleeping."}]
    rendered = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == tokenizer.prompt(conversation)
