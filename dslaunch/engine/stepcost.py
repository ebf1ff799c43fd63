"""How many tokens a step may hold while rows decode, from what steps have cost (rank 0 only).

A token budget alone (`--max-step-tokens`) bounds a step's work, not its time. Where a pass costs
about the same for 1 token as for 128 (a GPU at small batches) that is the same thing; where each
token costs its share (a CPU), a step carrying a 128-token prompt chunk takes several decode
steps' time, and every decoding row waits for it. So rank 0 fits the step time it measured to
`a + b * tokens` (least squares over the last steps) and, while rows decode, caps the step at the
tokens that keep it within `--max-itl-ratio` times a decode-only step: `a + b * t <= ratio *
(a + b * decoding)`. Chunked prefill then spreads a long prompt over more, shorter steps. The cap
is rank 0's decision only: the other ranks receive the resulting steps as data, as always.
"""

from __future__ import annotations

from collections import deque

SAMPLES = 64  # steps the fit looks back over
MIN_SAMPLES = 8  # before this many, or with too little spread in tokens, no cap
MIN_CHUNK = 16  # prompt tokens a capped step still carries, so a joining prompt always advances


class StepCost:
    """The fit of step seconds against tokens computed, and the cap it implies."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._steps: deque[tuple[int, float]] = deque()
        self._sums = [0.0, 0.0, 0.0, 0.0]  # of tokens, seconds, tokens^2, tokens*seconds: O(1) a step
        self.capped = 0  # steps the cap held to fewer tokens than the budget (`stats`: steps_capped)
        self._last: tuple[int, int] | None = None  # the last cap given, and the budget it lowered

    def observe(self, tokens: int, seconds: float) -> None:
        """A step ran: `tokens` computed in `seconds`, under the cap last given (if it filled it)."""
        if self._last is not None and tokens == self._last[0] < self._last[1]:
            self.capped += 1
        self._last = None
        self._add(tokens, seconds, 1)
        self._steps.append((tokens, seconds))
        if len(self._steps) > SAMPLES:
            self._add(*self._steps.popleft(), -1)

    def _add(self, t: float, s: float, sign: int) -> None:
        for i, v in enumerate((t, s, t * t, t * s)):
            self._sums[i] += sign * v

    def fit(self) -> tuple[float, float] | None:
        """(seconds per step, seconds per token), or None while the steps cannot tell them apart."""
        n = len(self._steps)
        if n < MIN_SAMPLES:
            return None
        sx, sy, sxx, sxy = self._sums
        var = sxx - sx * sx / n
        if var < n:  # token counts within about one of each other: no slope to read
            return None
        b = (sxy - sx * sy / n) / var
        return (sy - b * sx) / n, b

    def cap(self, decoding: int, budget: int) -> int:
        """The most tokens this step may compute, with `decoding` rows waiting on it for their next token."""
        if self.ratio <= 0 or decoding == 0:
            return budget
        fitted = self.fit()
        if fitted is None:
            return budget
        a, b = fitted
        if b <= 0:
            return budget  # tokens cost nothing measurable: the budget is the only bound
        tokens = int((self.ratio * (max(a, 0.0) + b * decoding) - max(a, 0.0)) / b)
        capped = min(budget, max(decoding + MIN_CHUNK, tokens))
        self._last = (capped, budget)
        return capped
