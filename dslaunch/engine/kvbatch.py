"""The running batch of a causal LM on every rank: one left-padded KV cache that rows join and leave.

Each row's attention mask is zeros (padding) then ones, and every step appends one column for
every row, so the columns that are padding in every row are always a prefix and can be trimmed.
A step does, in this order and identically on every rank:

- leave: keep the surviving rows (`batch_select_indices`), trim the all-padding prefix;
- decode: feed one token per surviving row (positions from each row's own count);
- join: prefill the new rows on a cache of their own with `logits_to_keep=1`, then left-pad
  both caches to one length and concatenate them.

The logits come back in row order: survivors first, joiners after them.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model: Any) -> str:
    """transformers 5 calls the cache argument `cache`; older versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class KVBatch:
    """The KV cache, attention mask and next position of every running row."""

    def __init__(self, model: Any, device: str, pad_id: int, cache_kw: str) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.cache_kw = cache_kw
        self.cache: Any = None
        self.mask: Any = None  # [rows, length] int64, 0 = padding
        self.pos: Any = None  # [rows] int64: the position id of each row's next token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def reset(self) -> None:
        self.cache = self.mask = self.pos = None

    def step(self, keep: list[int] | None, tokens: list[int], joins: list[list[int]]) -> Any:
        """Leave (rows not in `keep`), decode `tokens` for the survivors, join `joins`.

        Returns the last-position logits, [survivors + joiners, vocab], or None when no row runs.
        """
        if keep is not None:
            self.leave(keep)
        parts = []
        if self.rows:
            parts.append(self.decode(tokens))
        if joins:
            parts.append(self.join(joins))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        import torch

        return torch.cat(parts, dim=0)

    def leave(self, keep: list[int]) -> None:
        if len(keep) == self.rows:
            return
        if not keep:
            self.reset()
            return
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        self.pos = self.pos.index_select(0, idx)
        # padding columns in every remaining row are a prefix: drop them
        trim = int(self.mask.argmax(dim=1).min())  # first real column of the row with the least padding
        if trim:
            self.mask = self.mask[:, trim:]
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[..., trim:, :]
                    layer.values = layer.values[..., trim:, :]

    def decode(self, tokens: list[int]) -> Any:
        import torch

        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.pos.unsqueeze(1),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.pos = self.pos + 1
        return out.logits[:, -1, :]

    def join(self, prompts: list[list[int]]) -> Any:
        import torch
        from transformers import DynamicCache

        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, n - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: cache},
        )
        pos = mask.sum(dim=1)
        if not self.rows:
            self.cache, self.mask, self.pos = cache, mask, pos
        else:
            self._merge(cache, mask, pos)
        return out.logits[:, -1, :]

    def _merge(self, cache: Any, mask: Any, pos: Any) -> None:
        """Left-pad the running cache and the joiners' cache to one length and stack them."""
        import torch
        from torch.nn.functional import pad

        a, b = self.length, int(mask.shape[1])
        n = max(a, b)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, (0, 0, n - a, 0)), pad(theirs.keys, (0, 0, n - b, 0))], dim=0)
            mine.values = torch.cat([pad(mine.values, (0, 0, n - a, 0)), pad(theirs.values, (0, 0, n - b, 0))], dim=0)
        self.mask = torch.cat([pad(self.mask, (n - a, 0)), pad(mask, (n - b, 0))], dim=0)
        self.pos = torch.cat([self.pos, pos], dim=0)
