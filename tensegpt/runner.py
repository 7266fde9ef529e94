"""
The serving engine's runner (nano-vllm's model_runner.py): the KV cache, one row ("slot") per
sequence, and the two layouts of a step's forward pass through the model's own forward.

A step of decoding only is a batch of rows of one token, each at its own position. A step with
prompt chunks in it packs every token into one row, as vLLM does, so that neither the decoding
rows nor the short prompts are padded to the longest: each token has its own position, and a
mask keeps it to its own sequence's keys. docs/serving.md measures both.
"""

import torch


class SlotCache:
    """
    One layer's KV cache seen through a batch's slots: row i of the batch is row slots[i] of the cache. It does what
    model.KVCache.update does, on those rows only. end: the positions the longest row holds after this step.
    """

    def __init__(self, cache, slots, end):
        self.cache, self.slots, self.end = cache, slots, end

    def update(self, input_pos, k, v):
        rows = self.slots[:, None]  # (B, 1)
        # indexing slots and positions (B, T) together puts them first: (B, T, n_kv_head, hs)
        self.cache.k[rows, :, input_pos] = k.transpose(1, 2)
        self.cache.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.cache.k[self.slots, :, : self.end], self.cache.v[self.slots, :, : self.end]


class PackedCache:
    """
    One layer's KV cache for a packed step: the step's tokens in one row, token j belonging to the sequence in slot
    slot_of_token[j] at position input_pos[0, j]. It writes each token's key and value there and reads the batch's
    slots laid side by side in one row, end positions each, for the mask to pick from.
    """

    def __init__(self, cache, slots, slot_of_token, end):
        self.cache, self.slots, self.slot_of_token, self.end = cache, slots, slot_of_token, end

    def update(self, input_pos, k, v):
        # (1, n_kv_head, N, hs) -> (N, n_kv_head, hs): indexing slots and positions together puts them first
        self.cache.k[self.slot_of_token, :, input_pos[0]] = k[0].transpose(0, 1)
        self.cache.v[self.slot_of_token, :, input_pos[0]] = v[0].transpose(0, 1)
        k, v = self.cache.k[self.slots, :, : self.end], self.cache.v[self.slots, :, : self.end]
        # (B, n_kv_head, end, hs) -> (1, n_kv_head, B * end, hs): the slots side by side
        return tuple(t.transpose(0, 1).flatten(1, 2)[None] for t in (k, v))


class Runner:
    def __init__(self, model, max_batch):
        self.model, self.device = model, next(model.parameters()).device
        self.caches = model.new_caches(max_batch)

    def logits(self, batch, logits_at):
        """
        One forward pass over batch [(sequence, the tokens it feeds)]: the logits (N, V) at logits_at, indices into
        the fed tokens laid end to end. Sequence i's tokens go in at its positions cached, cached + 1, ...
        """
        slots = torch.tensor([s.slot for s, _ in batch], device=self.device)
        at = torch.tensor(logits_at, device=self.device)
        if all(len(fed) == 1 for _, fed in batch):
            return self.rows(batch, slots, at)
        return self.packed(batch, slots, at)

    def rows(self, batch, slots, at):
        input_pos = torch.tensor([[s.cached] for s, _ in batch], device=self.device)  # (B, 1)
        tokens = torch.tensor([fed for _, fed in batch], device=self.device)  # (B, 1)
        # every layer reads keys up to the longest row's end: counted here once, not read back per layer
        end = max(s.cached for s, _ in batch) + 1
        caches = [SlotCache(c, slots, end) for c in self.caches]
        return self.model(tokens, caches=caches, input_pos=input_pos, logits_at=at)[0]

    def packed(self, batch, slots, at):
        tokens, rows, input_pos = [], [], []
        for i, (s, fed) in enumerate(batch):
            tokens += fed
            rows += [i] * len(fed)
            input_pos += range(s.cached, s.cached + len(fed))
        rows, input_pos = torch.tensor(rows, device=self.device), torch.tensor([input_pos], device=self.device)
        end = int(input_pos.max()) + 1
        # the keys of all B slots side by side, end positions each: key k is position k % end of row k // end
        key_rows = torch.arange(len(batch), device=self.device).repeat_interleave(end)  # (B * end,)
        key_positions = torch.arange(end, device=self.device).repeat(len(batch))  # (B * end,)
        mask = (key_rows == rows[:, None]) & (key_positions <= input_pos[0, :, None])  # (N, B * end)
        caches = [PackedCache(c, slots, slots[rows], end) for c in self.caches]
        tokens = torch.tensor([tokens], device=self.device)  # (1, N)
        return self.model(tokens, caches=caches, input_pos=input_pos, mask=mask[None, None], logits_at=at)[0]
