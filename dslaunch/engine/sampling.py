"""Choosing every row's next token in one pass on the device (rank 0 only).

Greedy rows take one argmax for the whole batch. Sampled rows get their temperature, top-k and
top-p masks, then inverse-CDF sampling: one uniform number per row, drawn from a counter-based
hash of (seed, step), picks the token where the row's cumulative probability reaches it. A row's
draw depends on nothing but its own seed and position, so a seeded request gives the same text
whatever else shares its batch, and no generator state has to live anywhere. (Gumbel-max needs
a hash per vocabulary entry: about 10 ms per row at a 128k vocabulary on one CPU core, against
about 1 ms for the softmax and cumulative sum here.) One `.tolist()` ends the step: one sync.

Degenerate parameters never raise: a temperature below `MIN_TEMPERATURE` is greedy, and
non-finite logits are cleaned (a row with nothing finite left falls back to the raw argmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dslaunch.wire.protocol import GenParams

# Below this, logits / T overflows float32 for ordinary logits: the answer is the argmax anyway.
MIN_TEMPERATURE = 1e-4
_M32 = 0xFFFFFFFF
# top-k / top-p look at this many best tokens first (a full sort only if they hold too little mass)
CANDIDATES = 256


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its tokens; `seed` is always set for sampled rows (random when not asked)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @classmethod
    def of(cls, p: GenParams, fresh_seed: int) -> RowSampling:
        greedy = p.temperature < MIN_TEMPERATURE
        return cls(
            temperature=0.0 if greedy else float(p.temperature),
            top_p=float(p.top_p),
            top_k=int(p.top_k),
            seed=fresh_seed if p.seed is None else int(p.seed),
        )


def _mix32(x: int) -> int:
    """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform(seed: int, step: int) -> float:
    """A number in (0, 1) that depends only on (seed, step): the draw of one row at one step."""
    key = _mix32(_mix32(_mix32((step + 0x9E3779B9) & _M32) ^ (seed >> 32 & _M32)) ^ (seed & _M32))
    hi, lo = _mix32(key ^ 0x85EBCA6B), _mix32(key ^ 0xC2B2AE35)
    return ((hi << 21 | lo >> 11) + 0.5) / float(1 << 53)


def choose(logits: Any, rows: list[RowSampling], steps: list[int]) -> list[int]:
    """The next token of every row. `logits` is [rows, vocab] on the device; `steps[i]` is how
    many tokens row i has generated so far (the counter of its draws)."""
    import torch

    out = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled:
        sel = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        picks = _sample(logits.index_select(0, sel), [rows[i] for i in sampled], [steps[i] for i in sampled])
        out = out.index_copy(0, sel, picks)
    return [int(t) for t in out.tolist()]


def _sample(logits: Any, rows: list[RowSampling], steps: list[int]) -> Any:
    import torch

    dev = logits.device
    raw = logits.float()
    x = torch.nan_to_num(raw, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    top = x.max(dim=-1, keepdim=True).values
    finite = torch.isfinite(top)
    temp = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev).unsqueeze(1)
    # shifted so that the largest is 0: dividing by a small temperature gives -inf, never nan
    x = (x - torch.where(finite, top, torch.zeros_like(top))) / temp
    vocab = x.shape[-1]
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in rows]
    ps = [r.top_p for r in rows]
    u = torch.tensor([uniform(r.seed, s) for r, s in zip(rows, steps, strict=True)], dtype=torch.float32, device=dev)
    plain = [i for i in range(len(rows)) if ks[i] == vocab and ps[i] >= 1.0]
    picked = torch.empty(len(rows), dtype=torch.long, device=dev)
    if plain:
        at = torch.tensor(plain, device=dev)
        picked[at] = _draw(torch.softmax(x[at], dim=-1), u[at])
    if len(plain) < len(rows):
        at = torch.tensor([i for i in range(len(rows)) if i not in set(plain)], device=dev)
        picked[at] = _filtered(x[at], [ks[i] for i in at.tolist()], [ps[i] for i in at.tolist()], u[at])
    # a row with no finite logit at all: the plain argmax rather than an arbitrary index
    return torch.where(finite.squeeze(1), picked, torch.argmax(raw, dim=-1))


def _filtered(x: Any, ks: list[int], ps: list[float], u: Any) -> Any:
    """Top-k, then top-p (the smallest set with that much probability; the top token always
    stays), over the best `CANDIDATES` tokens: a full sort only when those hold too little mass."""
    import torch

    dev, vocab = x.device, x.shape[-1]
    k = torch.tensor(ks, device=dev).unsqueeze(1)
    p = torch.tensor(ps, dtype=torch.float32, device=dev).unsqueeze(1)
    whole = k >= vocab  # no top-k: top-p measures mass against the whole vocabulary
    width = min(vocab, max([CANDIDATES] + [kk for kk in ks if kk < vocab]))
    for attempt in (width, vocab):
        vals, order = torch.topk(x, attempt) if attempt < vocab else torch.sort(x, dim=-1, descending=True)
        vals = vals.masked_fill(torch.arange(attempt, device=dev).unsqueeze(0) >= k, float("-inf"))
        lse = torch.where(whole, torch.logsumexp(x, -1, keepdim=True), torch.logsumexp(vals, -1, keepdim=True))
        probs = torch.exp(vals - lse)
        if attempt == vocab or bool(((probs.sum(-1, keepdim=True) >= p) | ~whole | (p >= 1.0)).all()):
            break
    drop = (torch.cumsum(probs, dim=-1) - probs >= p) & (p < 1.0)
    drop[:, 0] = False
    return order.gather(1, _draw(probs.masked_fill(drop, 0.0), u).unsqueeze(1)).squeeze(1)


def _draw(probs: Any, u: Any) -> Any:
    """Inverse CDF: per row, the first index where the cumulative probability reaches u x total."""
    import torch

    cdf = torch.cumsum(probs, dim=-1)
    at = torch.searchsorted(cdf, (u.unsqueeze(1) * cdf[:, -1:]).contiguous()).squeeze(1)
    return at.clamp_(max=cdf.shape[-1] - 1)
