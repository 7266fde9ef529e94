"""
Chat: the template that turns a conversation into tokens, and the JSONL reader (no torch:
prepare.py uses them). Batches of whole conversations are packing.py; an answer, decoding.py.

A conversation, one JSON object a line (OpenAI's and Hugging Face's chat format):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

becomes, with four special tokens that every tokenizer gets after its own ids,

    <|endoftext|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

and the trained tokens are each assistant turn and the <|end|> that closes it: the model
learns to answer, not to ask. A typed "<|user|>" inside a message is text (its characters
or BPE pieces), never the special token: only the template makes those.
"""

import json
import os

from model import IGNORE  # noqa: F401 - a target the loss leaves out (packing, tests)
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


def read_records(path):
    """
    [(messages, tags)] of a JSONL file, each checked; a UserError names the line and what is wrong. tags: the
    line's other keys with a plain value (make_tense.py's "task", "family", "phrasing"), what eval.py groups the
    answers by; {} if none.
    """
    conversations = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark marks the encoding; it is not text
            lines = list(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            # RecursionError: brackets nested deeper than the parser goes
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
            raise UserError(
                f"{where} is not JSON ({reason}): each line is one conversation, "
                '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
            ) from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(f'{where} has no "messages" list: write {{"messages": [{{"role": ..., "content": ...}}]}}')
        for i, message in enumerate(messages, 1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise UserError(f'{where}: message {i} needs a "role" and a "content"')
            if message["role"] not in ROLES:
                raise UserError(
                    f"{where}: message {i} has role {message['role']!r}; a role is one of {', '.join(ROLES)}"
                )
            if not isinstance(message["content"], str):
                raise UserError(f"{where}: message {i}'s content is {type(message['content']).__name__}, not text")
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the conversation ends with a {messages[-1]['role']} turn; end it with the assistant's answer"
            )
        empty = [i for i, m in enumerate(messages, 1) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            raise UserError(f"{where}: assistant message {empty[0]} is empty: nothing to learn from it")
        tags = {k: v for k, v in record.items() if k != "messages" and isinstance(v, (str, int, float, bool))}
        conversations.append(([{"role": m["role"], "content": m["content"]} for m in messages], tags))
    if not conversations:
        raise UserError(f"{path} holds no conversation: write one JSON object a line")
    return conversations


def numbered_contents(*paths):
    """('PATH line N', content) for each message of JSONL files that read_records accepted."""
    for path in filter(None, paths):
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                for message in json.loads(line)["messages"] if line.strip() else []:
                    yield f"{path} line {number}", message["content"]


def read_val_tags(data_dir, meta, count):
    """Each val conversation's tags (prepare.py's val.tags.jsonl), or {} for each where the data has none."""
    if not meta.get("val_tags"):
        return [{}] * count
    path = os.path.join(data_dir, meta["val_tags"])
    try:
        with open(path, encoding="utf-8") as f:
            tags = [json.loads(line) for line in f]
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {path} ({e}): run prepare.py again") from None
    if len(tags) != count:
        raise UserError(f"{path} tags {len(tags)} conversations, val.bin holds {count}: run prepare.py again")
    return tags


def is_chat_file(path):
    return path.lower().endswith(".jsonl")
