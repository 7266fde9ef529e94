"""
Every shape export.py --format=gguf writes, loaded by llama.cpp itself (llama-cpp-python,
which vendors it; .ci/run builds it): the tokenizer gives the project's ids, the logits are
the checkpoint's, greedy text is sample.py --greedy's and a chat answer sample.py --chat's.

Tolerances. F32 and F16 files: the largest logit difference within 2e-3 of the largest
logit (or of 1, for a random model's small logits). llama.cpp keeps its KV cache in F16 by
default (what users run), which rounds keys and values to 2^-11 of their size; on the quick
start's model that left 2.7e-4 (F32) and 4.0e-4 (F16), so the bound has a margin of 5 and
still catches a wrong tensor by orders of magnitude. BF16 keeps 8 bits of mantissa (2^-9,
four times F16's rounding): 1e-2. Q8_0 rounds each weight to 1/127 of its block's largest:
the top token must agree at 90% of the positions and the difference stay within 5% of the
largest logit.
"""

import itertools
import json
import subprocess
import sys
import time

import httpx
import llama_cpp  # no skip: a machine without llama.cpp fails here, as CI must
import numpy as np
import pytest
import torch
from helpers import Server, fails, fine_tune_chat, free_port, run_script, tense_lines
from test_export import COMPACT, SAMPLES, SHAPES, random_checkpoint

from tensegpt.chat import ChatTokenizer
from tensegpt.checkpoint import load_model
from tensegpt.tokenizer import GPT2

pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
TOLERANCE = {"f32": 2e-3, "f16": 2e-3, "bf16": 1e-2}


def load(path, n_ctx=64):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=1)  # fmt: skip


def logits_of(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def own_logits(model, ids, vocab_size):
    with torch.no_grad():
        return model(torch.tensor([ids]), logits_at=torch.arange(len(ids)))[0][:, :vocab_size].float().numpy()


def greedy_tokens(llm, ids, n):
    llm.reset()
    return list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), n))


def gap(theirs, ours):
    return float(np.abs(theirs - ours).max() / max(1.0, np.abs(ours).max()))


# (an output layer of its own, and other edits of model.py: tests/test_forks.py exports each fork to GGUF too)
CASES = {**SHAPES, "gpt2 vocabulary": SHAPES["llama"]}


@pytest.mark.parametrize("case", list(CASES))
def test_each_shape_loads_in_llama_cpp_with_the_same_ids_logits_and_greedy_tokens(case, tmp_path):
    tokenizer = GPT2() if case == "gpt2 vocabulary" else COMPACT
    tokenizer = ChatTokenizer(tokenizer) if "chat" in case else tokenizer
    model = random_checkpoint(tmp_path / "model.pth", tokenizer, **CASES[case])
    text = "By next year, our teacher will have washed the car. Zebras 🙂"
    ids = tokenizer.encode(text)
    ours = own_logits(model, ids, tokenizer.vocab_size)
    for outtype in ("f32", "f16", "bf16"):
        out = run_script("export.py", "--ckpt=model.pth", "--format=gguf", f"--outtype={outtype}",
                         f"--out={outtype}.gguf", cwd=tmp_path).stdout  # fmt: skip
        assert out.startswith(f"wrote {outtype}.gguf (GGUF, ")
        llm = load(tmp_path / f"{outtype}.gguf")
        assert llm.n_vocab() == tokenizer.vocab_size
        assert gap(logits_of(llm, ids), ours) <= TOLERANCE[outtype], outtype
    # the tokenizer inside: the project's ids for seen and unseen text, and back
    for sample in SAMPLES:
        got = llm.tokenize(sample.encode(), add_bos=False, special=False)
        assert got == tokenizer.encode(sample), sample
        assert llm.detokenize(got).decode() == sample
    # greedy tokens: llama.cpp's sampler at temperature 0 against the checkpoint's generate
    llm = load(tmp_path / "f32.gguf")
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids[:4]]), 16, greedy=True)[0, 4:].tolist()
    assert greedy_tokens(llm, ids[:4], 16) == expected


def test_the_file_says_what_llama_cpp_needs_to_know(tmp_path):
    import gguf

    random_checkpoint(tmp_path / "chat.pth", ChatTokenizer(COMPACT), **SHAPES["qwen3"])
    run_script("export.py", "--ckpt=chat.pth", "--format=gguf", "--outtype=q8_0", "--out=chat.gguf", cwd=tmp_path)
    reader = gguf.GGUFReader(tmp_path / "chat.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tokenizer = ChatTokenizer(COMPACT)
    assert fields["general.architecture"] == "qwen3" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.eot
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == tokenizer.end
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "<|assistant|>" in fields["tokenizer.chat_template"]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.end] == "<|end|>"
    # the template's tokens and the end-of-text are control tokens, every other one normal
    assert [i for i, t in enumerate(types) if t == 3] == sorted({tokenizer.eot, *range(COMPACT.vocab_size, len(types))})
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"


@pytest.fixture(scope="module")
def chat_model(trained_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_chat")
    base = trained_run / "out" / "trained.pth"
    return fine_tune_chat(folder, base, "--n_embd=64", "--max_iters=60", "--eval_interval=60")


def test_a_trained_model_writes_in_llama_cpp_what_sample_py_writes(trained_run, tmp_path):
    ckpt = trained_run / "out" / "trained.pth"
    model, tokenizer, _ = load_model(str(ckpt))
    for outtype in ("f32", "q8_0"):
        run_script("export.py", f"--ckpt={ckpt}", "--format=gguf", f"--outtype={outtype}", f"--out={outtype}.gguf",
                   cwd=tmp_path)  # fmt: skip
    f32, q8 = load(tmp_path / "f32.gguf", 128), load(tmp_path / "q8_0.gguf", 128)
    for start in ("The baby is", "Yesterday, the teacher", "Will you"):
        said = run_script("sample.py", f"--ckpt={ckpt}", f"--start={start}", "--greedy", "--num_samples=1",
                          "--max_new_tokens=24", cwd=tmp_path).stdout.strip()  # fmt: skip
        reply = f32.create_completion(prompt=tokenizer.encode(start), max_tokens=24, temperature=0.0,
                                      repeat_penalty=1.0)  # fmt: skip
        assert start + reply["choices"][0]["text"] == said
    # Q8_0: the same top tokens nearly everywhere, and greedy text the same on most prompts
    lines = tense_lines(40)
    agree, same, worst = [], 0, 0.0
    for line in lines:
        ids = tokenizer.encode(line)
        theirs, ours = logits_of(q8, ids), own_logits(model, ids, tokenizer.vocab_size)
        agree += list(theirs.argmax(-1) == ours.argmax(-1))
        worst = max(worst, gap(theirs, ours))
        same += greedy_tokens(q8, ids[:3], 10) == greedy_tokens(f32, ids[:3], 10)
    assert np.mean(agree) >= 0.9 and worst <= 0.05, (np.mean(agree), worst)
    assert same >= 0.9 * len(lines)


def test_a_chat_model_answers_in_llama_cpp_as_sample_py_chat_does(chat_model, tmp_path):
    run_script("export.py", f"--ckpt={chat_model}", "--format=gguf", "--outtype=f32", "--out=chat.gguf", cwd=tmp_path)
    llm = load(tmp_path / "chat.gguf", 128)
    for question in ("Negate: The baby sleeps.", "Make this a question: She will be washing the car."):
        said = run_script("sample.py", f"--ckpt={chat_model}", "--chat", f"--start={question}", "--greedy",
                          cwd=tmp_path).stdout.strip()  # fmt: skip
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                           max_tokens=40, repeat_penalty=1.0)  # fmt: skip
        assert reply["choices"][0]["message"]["content"] == said, json.dumps(reply)
        assert reply["choices"][0]["finish_reason"] == "stop"


def test_what_a_gguf_file_cannot_hold_is_refused_and_nothing_is_overwritten(tmp_path):
    random_checkpoint(tmp_path / "relu.pth", COMPACT, pos_encoding="learned", activation="relu")
    assert fails("export.py", "--ckpt=relu.pth", "--format=gguf", cwd=tmp_path) == (
        "error: cannot export to GGUF: llama.cpp's GPT-2 uses GELU, not ReLU: train with --activation=gelu "
        "(or export --format=hf); nothing was written"
    )
    assert not (tmp_path / "model.gguf").exists()
    random_checkpoint(tmp_path / "model.pth", COMPACT, **SHAPES["llama"])
    (tmp_path / "model.gguf").write_bytes(b"mine")
    assert fails("export.py", "--format=gguf", "--ckpt=model.pth", cwd=tmp_path) == (
        "error: model.gguf exists: pass --overwrite=True to replace it, or another --out=FILE"
    )
    assert (tmp_path / "model.gguf").read_bytes() == b"mine"
    assert fails("export.py", "--format=gguf", "--outtype=q4_k", "--ckpt=model.pth", cwd=tmp_path) == (
        "error: --outtype must be one of f32, f16, bf16, q8_0, q5_0, q4_0, got 'q4_k'"
    )
    assert fails("export.py", "--outtype=q8_0", "--ckpt=model.pth", cwd=tmp_path) == (
        "error: --outtype is for --format=gguf; a Hugging Face folder holds float32 weights"
    )
    assert fails("export.py", "--format=gguf", "--adapter_out=a", "--ckpt=model.pth", cwd=tmp_path) == (
        "error: a GGUF file holds the LoRA adapters merged in: leave out --adapter_out (or use --format=hf)"
    )


def test_llama_cpps_server_answers_as_serve_py_does(chat_model, tmp_path):
    """The route a user takes: the file served by llama-cpp-python's OpenAI server, asked what serve.py is asked."""
    run_script("export.py", f"--ckpt={chat_model}", "--format=gguf", "--outtype=f16", "--out=chat.gguf", cwd=tmp_path)
    port = free_port()
    log = open(tmp_path / "llama-server.log", "w+")
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(tmp_path / "chat.gguf"), "--host",
               "127.0.0.1", "--port", str(port), "--n_ctx", "128", "--n_threads", "1"]  # fmt: skip
    theirs, ours = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), Server(chat_model)
    try:
        for _ in range(600):  # at most 60 s to start
            assert theirs.poll() is None, log.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        # (the model's context is 32 tokens: short questions, short answers)
        for question in ("Negate: The baby sleeps.", "Name the tense: We ate."):
            body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 12}
            # llama-cpp-python's server penalises repeats by default (1.1); serve.py does not
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "repeat_penalty": 1.0},
                                timeout=60).json()["choices"][0]  # fmt: skip
            expected = httpx.post(ours.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
            assert answer["message"]["content"] == expected["message"]["content"] != ""
            assert answer["finish_reason"] == expected["finish_reason"]
    finally:
        theirs.kill()
        theirs.wait(timeout=30)
        ours.stop()
