"""
Batches of whole conversations for chat fine-tuning (train.py --chat): rows of block_size + 1
tokens packed with conversations, a conversation never cut (docs/chat.md, "How rows are filled").
"""

import numpy as np
import torch

from tensegpt.chat import IGNORE
from tensegpt.common import UserError


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
            raise UserError(f"no conversation fits in block_size + 1 = {block_size + 1} tokens: raise --block_size")

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
