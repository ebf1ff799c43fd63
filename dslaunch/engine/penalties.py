"""Penalties, logit bias and min_tokens: the logits of the rows that ask, changed in one batched
pass on the device before the next token is chosen (rank 0 only, like sampling).

The same definitions as OpenAI and vLLM (and as transformers' logits processors, where it has
them), in this order:

1. `logit_bias`: added to the logits of the tokens it names;
2. `min_tokens`: the end-of-sequence tokens are impossible (-inf) until a row has that many;
3. `repetition_penalty` (transformers' and vLLM's): a token already in the prompt or the output
   has its logit divided by it when positive, multiplied when negative;
4. `frequency_penalty` and `presence_penalty` (OpenAI's): minus frequency x the token's count in
   the output so far, minus presence once if it occurs there at all.

Rows without any of them are left as they are (the whole tensor becomes float32 when some row
has one, which changes no argmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dslaunch.wire.protocol import GenParams


@dataclass(frozen=True)
class Penalties:
    """One row's penalties; `of` gives None for a row without any (most rows)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    @classmethod
    def of(cls, p: GenParams) -> Penalties | None:
        made = cls(p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias, p.min_tokens)
        return None if made == cls() else made


def apply(logits: Any, rows: list[Any], eos: set[int]) -> Any:
    """`logits` [rows, vocab] with each row's penalties applied. A row has `penalty` (Penalties or
    None), `out` (its generated ids), `prompt` (its prompt ids, kept when it has a repetition
    penalty) and `count` (tokens generated)."""
    import torch

    at = [i for i, r in enumerate(rows) if r.penalty is not None]
    if not at:
        return logits
    dev = logits.device
    x = logits.float()
    sel = torch.tensor(at, dtype=torch.long, device=dev)
    sub = x.index_select(0, sel)
    vocab = sub.shape[-1]
    ps: list[Penalties] = [rows[i].penalty for i in at]
    biased = [(j, t, b) for j, p in enumerate(ps) for t, b in p.bias if 0 <= t < vocab]
    if biased:
        jj, tt, bb = zip(*biased, strict=True)
        index = (torch.tensor(jj, device=dev), torch.tensor(tt, device=dev))
        sub.index_put_(index, torch.tensor(bb, dtype=torch.float32, device=dev), accumulate=True)
    early = [j for j, i in enumerate(at) if rows[i].count < ps[j].min_tokens]
    ends = [t for t in eos if 0 <= t < vocab]
    if early and ends:
        sub[torch.tensor(early, device=dev).unsqueeze(1), torch.tensor(ends, device=dev).unsqueeze(0)] = float("-inf")
    rep = [j for j, p in enumerate(ps) if p.repetition != 1.0]
    if rep:
        seen = _occurs([(rows[at[j]].prompt or []) + rows[at[j]].out for j in rep], vocab, dev) > 0
        r = torch.tensor([ps[j].repetition for j in rep], dtype=torch.float32, device=dev).unsqueeze(1)
        part = sub[rep]
        sub[rep] = torch.where(seen, torch.where(part > 0, part / r, part * r), part)
    freq = [j for j, p in enumerate(ps) if p.frequency or p.presence]
    if freq:
        counts = _occurs([rows[at[j]].out for j in freq], vocab, dev)
        f = torch.tensor([ps[j].frequency for j in freq], dtype=torch.float32, device=dev).unsqueeze(1)
        pr = torch.tensor([ps[j].presence for j in freq], dtype=torch.float32, device=dev).unsqueeze(1)
        sub[freq] = sub[freq] - f * counts - pr * (counts > 0).float()
    return x.index_copy(0, sel, sub)


def _occurs(seqs: list[list[int]], vocab: int, dev: Any) -> Any:
    """[len(seqs), vocab]: how often each token occurs in each sequence."""
    import torch

    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs], dtype=torch.long, device=dev)  # one copy
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=dev)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]
