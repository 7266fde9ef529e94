"""
Chat: the template that turns a conversation into tokens, the JSONL reader, and batches
of whole conversations for fine-tuning.

A conversation, one JSON object a line (OpenAI's and Hugging Face's chat format):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

becomes, with four special tokens that every tokenizer gets after its own ids,

    <|endoftext|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

and the trained tokens are each assistant turn and the <|end|> that closes it: the model
learns to answer, not to ask. A typed "<|user|>" inside a message is text (its characters
or BPE pieces), never the special token: only the template makes those.
"""

import json

import numpy as np
import torch

from tensegpt.chunked_loss import IGNORE  # a target the loss leaves out
from tensegpt.common import UserError

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class ChatTokenizer:
    """A tokenizer with the chat template's four special tokens after its own ids."""

    def __init__(self, base):
        self.base = base
        self.name, self.eot = base.name, base.eot
        n = base.vocab_size
        self.system, self.user, self.assistant, self.end = n, n + 1, n + 2, n + 3
        self.role_ids = {"system": self.system, "user": self.user, "assistant": self.assistant}
        self.vocab_size = n + len(CHAT_TOKENS)

    def encode(self, text):
        return self.base.encode(text)  # text only: the special tokens come from the template

    def decode(self, ids):
        return self.base.decode([i for i in ids if i < self.base.vocab_size])

    def unknown(self, text):
        return self.base.unknown(text)

    def meta(self):
        return {**self.base.meta(), "chat_tokens": CHAT_TOKENS}

    def encode_conversation(self, messages, train_on_prompt=False):
        """(ids, trained): the template's tokens, and 1 where the loss counts (the assistant's turns)."""
        ids, trained = [self.eot], [0]
        for message in messages:
            content = self.encode(message["content"])
            ids += [self.role_ids[message["role"]], *content, self.end]
            answer = message["role"] == "assistant" or train_on_prompt
            trained += [0] + [int(answer)] * (len(content) + 1)
        return ids, trained

    def prompt(self, messages):
        """The ids that ask for the next assistant turn after messages."""
        return self.encode_conversation(messages)[0] + [self.assistant]


def decode_conversations(tokenizer, ids):
    """The conversations of a split's ids (what encode_conversation made), as messages."""
    names = {v: k for k, v in tokenizer.role_ids.items()}
    conversations, messages, role, content = [], None, None, []
    for i in [int(t) for t in ids]:
        if i == tokenizer.eot:
            if messages:
                conversations.append(messages)
            messages = []
        elif i in names:
            role, content = names[i], []
        elif i == tokenizer.end and role is not None:
            messages.append({"role": role, "content": tokenizer.decode(content)})
            role = None
        elif role is not None:
            content.append(i)
    if messages:
        conversations.append(messages)
    return conversations


@torch.inference_mode()
def answer(model, tokenizer, messages, max_new_tokens=60, stream=None, **sampling):
    """The assistant's next turn after messages, up to <|end|> (greedy unless sampling says otherwise)."""
    ids = tokenizer.prompt(messages)[-model.config.block_size :]
    idx = torch.tensor([ids], device=model.wte.weight.device)
    new = []
    for step in model.generate_stream(idx, max_new_tokens, stop_token=tokenizer.end, **sampling):
        token = int(step)
        if token == tokenizer.end:
            break
        new.append(token)
        if stream is not None:
            stream(tokenizer.decode(new))
    return tokenizer.decode(new)


def read_conversations(path):
    """[messages] of a JSONL file, each checked; a UserError names the line and what is wrong."""
    conversations = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(
                f"{where} is not JSON ({str(e).split(':')[0]}): each line is one conversation, "
                '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
            ) from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(
                f'{where} has no "messages" list: write {{"messages": [{{"role": ..., "content": ...}}]}}'
            )
        for i, message in enumerate(messages, 1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise UserError(f'{where}: message {i} needs a "role" and a "content"')
            if message["role"] not in ROLES:
                raise UserError(
                    f"{where}: message {i} has role {message['role']!r}; a role is one of {', '.join(ROLES)}"
                )
            if not isinstance(message["content"], str):
                raise UserError(
                    f"{where}: message {i}'s content is {type(message['content']).__name__}, not text"
                )
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the conversation ends with a {messages[-1]['role']} turn; end it with the "
                "assistant's answer"
            )
        empty = [
            i for i, m in enumerate(messages, 1) if m["role"] == "assistant" and not m["content"].strip()
        ]
        if empty:
            raise UserError(f"{where}: assistant message {empty[0]} is empty: nothing to learn from it")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise UserError(f"{path} holds no conversation: write one JSON object a line")
    return conversations


def is_chat_file(path):
    return path.lower().endswith(".jsonl")


# ----------------------------------------------------------------------------- batches


class ChatBatches:
    """
    Rows of whole conversations, a training step's worth at a time, with the same interface
    as train.py's Batches. Each row of block_size + 1 tokens is filled with conversations
    drawn at random until the next one does not fit; the rest of the row is padding that no
    loss counts. A conversation is never cut: the model always sees a question with its
    answer. (Conversations packed in one row can attend to the ones before them, as
    documents can in pretraining: each starts with <|endoftext|>, which marks the break.)
    Conversations longer than a row are left out, and counted (self.too_long).
    """

    def __init__(self, split, batch_size, block_size, device, seed, grad_accum=1, rank=0, world_size=1,
                 train_on_prompt=False):  # fmt: skip
        tokens, trained = split
        self.B, self.T, self.device = batch_size, block_size, device
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens, self.trained = np.asarray(tokens, dtype=np.int64), np.asarray(trained, dtype=bool)
        eot = self.tokens[0]  # every conversation starts with end-of-text
        if train_on_prompt:  # every token after each conversation's end-of-text
            self.trained = self.tokens != eot
        starts = np.flatnonzero(self.tokens == eot)
        ends = np.append(starts[1:], len(self.tokens))
        fits = ends - starts <= block_size + 1
        self.starts, self.ends = starts[fits], ends[fits]
        self.too_long, self.pad = int((~fits).sum()), eot
        if not len(self.starts):
            raise UserError(
                f"no conversation fits in block_size + 1 = {block_size + 1} tokens: raise --block_size"
            )

    def step(self):
        """Yields this rank's grad_accum micro-batches (x, y) of one optimizer step, each (B, T)."""
        rows = [self.row() for _ in range(self.grad_accum * self.world_size * self.B)]  # every rank draws all
        mine = rows[self.rank * self.grad_accum * self.B : (self.rank + 1) * self.grad_accum * self.B]
        for m in range(self.grad_accum):
            x, y = zip(*mine[m * self.B : (m + 1) * self.B])
            yield torch.stack(x).to(self.device), torch.stack(y).to(self.device)

    def row(self):
        """(x, y) of one row: targets are the next tokens where they are trained, IGNORE elsewhere."""
        tokens = np.full(self.T + 1, self.pad, dtype=np.int64)
        trained = np.zeros(self.T + 1, dtype=bool)
        filled = 0
        while True:
            i = int(torch.randint(len(self.starts), (1,), generator=self.generator))
            s, e = self.starts[i], self.ends[i]
            if filled + e - s > self.T + 1:
                break
            tokens[filled : filled + e - s], trained[filled : filled + e - s] = (
                self.tokens[s:e],
                self.trained[s:e],
            )
            filled += e - s
        targets = np.where(trained[1:], tokens[1:], IGNORE)
        return torch.from_numpy(tokens[:-1]), torch.from_numpy(targets)
