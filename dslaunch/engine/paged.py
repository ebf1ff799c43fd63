"""The paged KV cache on every rank, and the attention function that reads and writes it.

`PagedKV` holds, per layer, K and V for every slot of the block pool (`[blocks * block_size,
kv_heads, head_dim]`: the local heads only under DeepSpeed AutoTP, grouped-query heads
included). A step is one forward pass over a flat batch: every scheduled row's tokens one after
another (`[1, tokens]`), each with its own position. `paged_attention` is registered with
transformers' `AttentionInterface` under `ATTENTION`; models whose attention goes through that
interface call it once per layer, in layer order. It writes the layer's new K/V into their
slots, then attends each row over its own slots: all decoding rows (one token each) in one
batched SDPA over their padded slot lists, each prefill chunk in an SDPA of its own (causal
within the chunk, after the row's cached tokens). No attention mask is built by transformers
for an implementation it does not know, which is what this wants.

Families whose attention does not go through the interface (Falcon, BLOOM) keep the
left-padded cache (`engine/kvbatch.py`); `supports_paged` decides from the model class, and
`PagedKV.probe` confirms it at start-up (every layer must have called the function).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

ATTENTION = "dslaunch_paged"
BLOCK_SIZE = 16  # tokens per KV block
_active = threading.local()


@dataclass
class StepLayout:
    """One packed step as flat integer lists (what crosses between ranks), rank-independent.

    Row r computes `lens[r]` tokens, at positions `starts[r] ...`, over the blocks `tables[r]`;
    `sample[r]` says whether its last token's logits are wanted, `every[r]` (empty: none) whether
    the logits of all its tokens are (a prompt being scored). Every rank keeps the same logits:
    a tensor-parallel LM head gathers them across ranks."""

    tokens: list[int]
    starts: list[int]
    lens: list[int]
    tables: list[list[int]]
    sample: list[bool]
    every: list[bool] = field(default_factory=list)

    def keeps_all(self, r: int) -> bool:
        return bool(self.every) and self.every[r]

    def flat(self) -> list[int]:
        """The layout as one flat list of integers: per row (start, tokens, what to keep, blocks),
        then every row's block table, then every row's tokens (what followers receive). What to
        keep is 1 for the last token's logits, plus 2 for all of them."""
        keep = [int(self.sample[r]) + 2 * self.keeps_all(r) for r in range(len(self.lens))]
        head = [v for r in range(len(self.lens)) for v in (self.starts[r], self.lens[r], keep[r], len(self.tables[r]))]
        return head + [b for t in self.tables for b in t] + self.tokens

    @classmethod
    def of_flat(cls, flat: list[int], rows: int, blocks: int, size: int) -> StepLayout:
        """Decode `flat`, refusing anything this rank cannot apply (the ranks are out of step)."""
        head, at = flat[: 4 * rows], 4 * rows
        starts, lens, tables = head[0::4], head[1::4], []
        sample, every = [bool(v & 1) for v in head[2::4]], [bool(v & 2) for v in head[2::4]]
        for start, n, k in zip(starts, lens, head[3::4], strict=True):
            table = flat[at : at + k]
            at += k
            if n < 1 or start < 0 or len(table) != k or k * size < start + n or not all(0 <= b < blocks for b in table):
                raise RuntimeError("a paged step this rank cannot apply: the ranks are out of step")
            tables.append(table)
        tokens = flat[at:]
        if len(tokens) != sum(lens) or len(head) != 4 * rows:
            raise RuntimeError("a paged step of the wrong length: the ranks are out of step")
        return cls(tokens, starts, lens, tables, sample, every if any(every) else [])

    @classmethod
    def of_plan(cls, chunks: list[Any]) -> StepLayout:
        """The layout of a scheduler's chunks (`engine/scheduler.Chunk`)."""
        every = [c.every for c in chunks]
        return cls([t for c in chunks for t in c.tokens], [c.start for c in chunks], [len(c.tokens) for c in chunks],
                   [c.table for c in chunks], [c.sample for c in chunks], every if any(every) else [])  # fmt: skip


class _Step:
    """A step's tensors, built once and shared by every layer."""

    def __init__(self, layout: StepLayout, size: int, device: Any) -> None:
        import torch

        self.layer = 0
        positions, slots, keep, offset = [], [], [], 0
        self.decode: list[int] = []  # rows computing one token
        self.chunks: list[tuple[int, int, int, Any]] = []  # (first token, tokens, context, slots)
        contexts: list[list[int]] = []
        for r, (start, n, table) in enumerate(zip(layout.starts, layout.lens, layout.tables, strict=True)):
            ctx = [table[p // size] * size + p % size for p in range(start + n)]
            positions += range(start, start + n)
            slots += ctx[start:]
            if layout.keeps_all(r):
                keep += range(offset, offset + n)
            elif layout.sample[r]:
                keep.append(offset + n - 1)
            if n == 1:
                self.decode.append(offset)
                contexts.append(ctx)
            else:
                self.chunks.append((offset, n, start + n, torch.tensor(ctx, dtype=torch.long, device=device)))
            offset += n
        self.positions = torch.tensor([positions], dtype=torch.long, device=device)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.keep = torch.tensor(keep, dtype=torch.long, device=device)
        self.decode_rows = torch.tensor(self.decode, dtype=torch.long, device=device)
        width = max((len(c) for c in contexts), default=0)
        self.decode_slots = torch.zeros((len(contexts), width), dtype=torch.long)
        self.decode_valid = torch.zeros((len(contexts), width), dtype=torch.bool)
        for i, c in enumerate(contexts):
            self.decode_slots[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            self.decode_valid[i, : len(c)] = True
        self.decode_lens = [len(c) for c in contexts]
        self.decode_slots = self.decode_slots.to(device).view(-1)  # index_select: a 2-D index costs 4x
        self.decode_valid = self.decode_valid.to(device)
        self.decode_width = width
        self.decode_ragged = any(n != width for n in self.decode_lens)  # else no mask: every slot counts
        self.decode_only = not self.chunks  # every token is a decoding row's, in order


class PagedKV:
    """Every layer's K/V pool on this rank, and the packed forward pass over it."""

    def __init__(self, model: Any, blocks: int, block_size: int, device: Any) -> None:
        self.model, self.blocks, self.size, self.device = model, blocks, block_size, device
        self.keys: list[Any] = []
        self.values: list[Any] = []

    def pool(self, layer: int, like: Any) -> tuple[Any, Any]:
        """Layer `layer`'s pool, made on first use with the shape of its (local) K/V heads."""
        import torch

        while len(self.keys) <= layer:
            shape = (self.blocks * self.size, like.shape[1], like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        return self.keys[layer], self.values[layer]

    def step(self, layout: StepLayout) -> Any:
        """One forward pass; the logits kept, `[kept, vocab]`: per row in order, all of its tokens'
        when it keeps all, else its last token's when it samples (`PackedBatch.after` splits them)."""
        import torch

        step = _Step(layout, self.size, self.device)
        ids = torch.tensor([layout.tokens], dtype=torch.long, device=self.device)
        _active.state = (self, step)
        try:
            out = self.model(input_ids=ids, position_ids=step.positions, use_cache=False, logits_to_keep=step.keep)
        finally:
            _active.state = None
        self.layers_called = step.layer
        return out.logits[0]

    def probe(self) -> int:
        """A one-token forward pass over block 0; the number of layers that used the pool."""
        self.step(StepLayout([0], [0], [1], [[0]], [True]))
        return self.layers_called


def paged_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
    dropout: float = 0.0, **kwargs: Any,
) -> tuple[Any, None]:  # fmt: skip
    """transformers' attention signature: query `[1, heads, T, dim]`, key/value `[1, kv_heads, T,
    dim]`; returns `[1, T, heads, dim]`."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    state = getattr(_active, "state", None)
    if state is None:
        raise RuntimeError("the paged attention ran outside a paged step")
    kv, step = state
    k_pool, v_pool = kv.pool(step.layer, key)
    step.layer += 1
    k_pool.index_copy_(0, step.slots, key[0].transpose(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(0, step.slots, value[0].transpose(0, 1).to(v_pool.dtype))
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if step.decode:
        rows, width = len(step.decode), step.decode_width
        q = query[0] if step.decode_only else query[0].index_select(1, step.decode_rows)
        q = q.transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
        k = k_pool.index_select(0, step.decode_slots).view(rows, width, kv_heads, -1).transpose(1, 2)
        v = v_pool.index_select(0, step.decode_slots).view(rows, width, kv_heads, -1).transpose(1, 2)
        mask = None  # [rows, kv_heads, width, dim] of equal lengths: nothing to mask
        if step.decode_ragged or window:
            valid = step.decode_valid
            if window:
                lens = torch.tensor(step.decode_lens, device=valid.device).unsqueeze(1)
                valid = valid & (torch.arange(valid.shape[1], device=valid.device) > lens - 1 - window)
            mask = valid[:, None, None, :]
        o = sdpa(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)[:, :, 0].to(query.dtype)
        if step.decode_only:
            return o.unsqueeze(0), None  # [1, rows, heads, dim]: the rows are the tokens, in order
    out = query.new_empty((1, query.shape[2], heads, query.shape[3]))
    if step.decode:
        out[0, step.decode_rows] = o
    for first, n, ctx, slots in step.chunks:
        q = query[:, :, first : first + n]
        k = k_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        v = v_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        qpos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
        kpos = torch.arange(ctx, device=q.device).unsqueeze(0)
        mask = kpos <= qpos
        if window:
            mask = mask & (kpos > qpos - window)
        o = sdpa(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[0, first : first + n] = o[0].transpose(0, 1).to(out.dtype)
    return out, None


def register() -> None:
    """Make `ATTENTION` a name transformers' models accept as their attention implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention)


def supports_paged(model: Any) -> bool:
    """Whether the model's attention goes through transformers' `AttentionInterface`."""
    return bool(getattr(type(model), "_supports_attention_backend", False))


def use_paged(model: Any, name: str = ATTENTION) -> str:
    """Route the model's attention (every sub-config's, too) through `name`, the paged function
    by default; returns the implementation it used before."""
    register()
    before, seen = getattr(model.config, "_attn_implementation", None) or "sdpa", set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            cfg._attn_implementation = name
    return before
