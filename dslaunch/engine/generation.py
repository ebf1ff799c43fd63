"""Rank 0's view of the running rows: choosing tokens, streaming text, finishing rows.

Only rank 0 runs this. It never raises for one row's sake: an error while sampling falls back
to greedy for the step, and an error in one row's text (a tokenizer that cannot decode a token,
a sink that fails) ends that row with `internal` while the others go on.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dslaunch.engine.base import RowSink
from dslaunch.engine.decode import TextStream
from dslaunch.engine.grammar import mask as grammar_mask
from dslaunch.engine.logprobs import joined_docs, prompt_logprobs, token_logprobs
from dslaunch.engine.penalties import Penalties
from dslaunch.engine.penalties import apply as apply_penalties
from dslaunch.engine.sampling import RowSampling, choose
from dslaunch.wire.protocol import INTERNAL, GenParams, ProtocolError


def row_budget(prompt_tokens: int, params: GenParams, max_positions: int) -> int:
    """Most new tokens of a row: max_new_tokens, cut to what the model's positions allow."""
    return max(1, min(params.max_new_tokens, max_positions - prompt_tokens))


@dataclass
class Row:
    """One prompt being generated: its budget, sampling, text so far and where answers go."""

    sink: RowSink
    prompt_tokens: int
    budget: int  # most new tokens: max_new_tokens, cut to what the model's positions allow
    sampling: RowSampling
    text: TextStream
    count: int = 0
    next_token: int = 0  # chosen at the last step, fed at the next one
    reason: str | None = None  # set once finished: eos, stop, length, cancelled, error
    ended: bool = field(default=False, repr=False)
    arrived: float = 0.0  # monotonic: when its request reached this front (for the observer's timings)
    joined: float = 0.0  # when it joined the batch
    last: float | None = None  # when its latest token was chosen (None: no token yet)
    penalty: Penalties | None = None  # penalties, logit bias, min_tokens (engine.penalties)
    ignore_eos: bool = False
    out: list[int] = field(default_factory=list, repr=False)  # generated ids (kept for penalties)
    prompt: list[int] | None = field(default=None, repr=False)  # kept for a repetition penalty
    top: int | None = None  # logprobs asked: alternatives per token
    logprobs: list[Any] = field(default_factory=list, repr=False)  # per counted token: (id, logprob, top)
    shaped: list[dict[str, Any]] = field(default_factory=list, repr=False)  # logprobs docs sent with chunks
    n_shaped: int = 0  # the entries of `logprobs` in those docs
    prompt_top: int | None = None  # prompt logprobs asked: alternatives per prompt token
    prompt_lps: list[Any] = field(default_factory=list, repr=False)  # for prompt tokens 1 ...: (logprob, top)
    score_only: bool = False  # max_new_tokens 0: the row ends once its prompt is scored
    prompt_sent: bool = False  # a stream's first chunk carried the scored prompt (logprobs["prompt"])
    matcher: Any = field(default=None, repr=False)  # structured output: the row's grammar state

    @property
    def cost(self) -> int:
        """Tokens this row may hold in the KV cache at most (what admission counts)."""
        return self.prompt_tokens + self.budget


class Generation:
    """The rows of the running batch on rank 0, in the same order as the KV cache's rows."""

    def __init__(self, decode: Callable[[list[int]], str], eos: set[int], max_positions: int) -> None:
        self.decode = decode
        self.eos = eos
        self.max_positions = max_positions
        self.rows: list[Row] = []
        self.joining: list[Row] = []  # rows in the step under way, not in `rows` until it is done
        # told each step's first tokens and gaps, and each row's end (serving.reqtimes.RequestTimes)
        self.observer: Any = None
        self.grammars: Any = None  # engine.grammar.Grammars: response_format (rank 0's tokenizer)

    def row(self, ids: list[int], params: GenParams, sink: RowSink) -> Row:
        """A new row for `ids`; its seed is drawn here when the request gave none."""
        budget = row_budget(len(ids), params, self.max_positions)
        sampling = RowSampling.of(params, secrets.randbits(63))
        now = time.monotonic()
        arrived = getattr(sink, "arrived", None) or now
        penalty = Penalties.of(params)
        scored = params.prompt_logprobs is not None
        prompt = list(ids) if scored or (penalty is not None and penalty.repetition != 1.0) else None
        text = TextStream(self.decode, params.stop)
        matcher, failed = None, None
        if params.response_format is not None and self.grammars is not None:
            try:
                matcher = self.grammars.matcher(params.response_format)  # compiled at the check: cached
            except Exception as e:  # this row fails, never the loop
                failed = e.message if isinstance(e, ProtocolError) else f"{type(e).__name__}: {e}"
        row = Row(sink, len(ids), budget, sampling, text, arrived=arrived, joined=now, penalty=penalty,
                   ignore_eos=params.ignore_eos, prompt=prompt, top=params.logprobs,
                   prompt_top=params.prompt_logprobs, score_only=params.max_new_tokens == 0,
                   matcher=matcher)  # fmt: skip
        if failed is not None:
            self.end(row, "error", (INTERNAL, f"the structured output's grammar failed: {failed}"[:500]))
        return row

    def remaining(self) -> list[int]:
        """How many more tokens each running row may generate (it may end sooner: eos, stop)."""
        return [r.budget - r.count for r in self.rows if r.reason is None]

    def costs(self) -> list[int]:
        """The most KV-cache tokens each running row may hold."""
        return [r.cost for r in self.rows if r.reason is None]

    def survivors(self) -> tuple[list[int], list[int]]:
        """Indices of the rows that go on, and the tokens to feed them."""
        keep = [i for i, r in enumerate(self.rows) if r.reason is None]
        return keep, [self.rows[i].next_token for i in keep]

    def advance(self, keep: list[int], joined: list[Row], logits: Any) -> int:
        """After a step: drop the rows that left, append the joiners, choose every row's next
        token from `logits`, stream its text and finish the rows that are done. Returns the
        number of tokens generated."""
        self.rows = [self.rows[i] for i in keep] + joined
        self.joining = []
        if logits is None or not self.rows:
            return 0
        return self.choose_next(self.rows, logits)

    def choose_next(self, rows: list[Row], logits: Any) -> int:
        """Choose the next token of each of `rows` (one row of `logits` each), stream its text and
        finish the rows that are done. Returns the number of tokens generated."""
        try:
            logits = apply_penalties(logits, rows, self.eos)
            logits = self._masked(logits, rows)
            tokens = choose(logits, [r.sampling for r in rows], [r.count for r in rows])
        except Exception:  # never expected: sampling is built not to raise; greedy keeps the loop going
            tokens = [int(t) for t in logits.argmax(dim=-1).tolist()]
        made = 0
        timed = self._timed(rows) if self.observer is not None else None
        lps = self._logprobs(rows, logits, tokens)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            try:
                made += self._push(row, token, lps.get(i))
            except Exception as e:
                self.end(row, "error", (INTERNAL, f"generating this prompt failed: {type(e).__name__}: {e}"[:500]))
        if timed is not None:
            self.observer.step(*timed, made)
        return made

    def _logprobs(self, rows: list[Row], logits: Any, tokens: list[int]) -> dict[int, Any]:
        """The rows that asked for logprobs, by index: (logprob, top alternatives)."""
        at = [i for i, r in enumerate(rows) if r.top is not None and r.reason is None]
        if not at:
            return {}
        try:
            got = token_logprobs(logits, at, tokens, [rows[i].sampling.temperature for i in at],
                                 [int(rows[i].top or 0) for i in at])  # fmt: skip
        except Exception:  # never expected; the text goes on without them
            return {}
        return dict(zip(at, got, strict=True))

    def _masked(self, logits: Any, rows: list[Row]) -> Any:
        """The structured-output rows' grammar masks, applied last (nothing re-allows a token). A
        mask that fails ends its batch's grammar rows, not the others."""
        try:
            return grammar_mask(logits, [None if r.ended else r.matcher for r in rows])
        except Exception as e:  # never expected
            for r in rows:
                if r.matcher is not None:
                    self.end(
                        r, "error", (INTERNAL, f"the structured output's mask failed: {type(e).__name__}: {e}"[:500])
                    )
            return logits

    def score_prompt(self, row: Row, first: int, logits: Any) -> None:
        """Logits rows for positions `first ...` of `row`: each scores the prompt token after it.
        Positions already scored (a preempted row computes its prompt again) are skipped."""
        prompt = row.prompt or []
        at = len(row.prompt_lps)  # the next position to score: it predicts prompt[at + 1]
        skip, end = at - first, min(first + len(logits), len(prompt) - 1)
        if end <= at or row.reason is not None:
            return
        if skip < 0:  # never expected: a scored row takes no cached prefix, and chunks come in order
            self.end(row, "error", (INTERNAL, f"scoring this prompt skipped positions {at} to {first - 1}"))
            return
        try:
            got = prompt_logprobs(logits[skip : end - first], prompt[at + 1 : end + 1], int(row.prompt_top or 0))
        except Exception as e:  # never expected: this row fails, the others go on
            self.end(row, "error", (INTERNAL, f"scoring this prompt failed: {type(e).__name__}: {e}"[:500]))
            return
        row.prompt_lps += got

    def _timed(self, rows: list[Row]) -> tuple[list[float], list[float], int]:
        """This step's first-token times (since arrival), gaps since the last token, and the prompt
        tokens of the rows getting their first token: what the observer counts."""
        now = time.monotonic()
        firsts: list[float] = []
        gaps: list[float] = []
        prompt = 0
        for row in rows:
            if row.last is None:
                firsts.append(now - row.arrived)
                prompt += row.prompt_tokens
            else:
                gaps.append(now - row.last)
            row.last = now
        return firsts, gaps, prompt

    def _push(self, row: Row, token: int, logprob: Any = None) -> int:
        if row.ended:  # answered already (an error, a cancel): it only leaves the batch
            return 0
        row.next_token = token
        if row.matcher is not None and not row.matcher.accept_token(token):
            self.end(row, "error", (INTERNAL, "the structured output's grammar refused the token chosen"))
            return 0
        if token in self.eos and not row.ignore_eos:
            self.end(row, "eos")
            return 0
        row.count += 1
        if row.penalty is not None:
            row.out.append(token)
        if logprob is not None:  # before the row may end below: its answer carries this token's
            row.logprobs.append((token, *logprob))
        text = row.text.push(token)
        if text:
            row.sink.chunk(text, self._with_prompt(row, self._logprob_piece(row)))
        if row.text.stopped or (row.matcher is not None and row.matcher.is_terminated()):
            self.end(row, "stop")
        elif row.count >= row.budget:
            self.end(row, "length")
        elif row.sink.cancelled():
            self.end(row, "cancelled")
        return 1

    def end(self, row: Row, reason: str, error: tuple[str, str] | None = None) -> None:
        """Finish a row now: its answer goes out at once; the KV cache drops it at the next step."""
        if row.ended:
            return
        row.reason, row.ended = reason, True
        if self.observer is not None:
            self.observer.ended(reason, time.monotonic() - row.arrived, row.joined - row.arrived)
        if error is None and reason != "cancelled":
            try:
                rest = row.text.finish()
                if rest:
                    row.sink.chunk(rest, self._with_prompt(row, self._logprob_piece(row)))
                result = {"text": row.text.text, "tokens": row.count, "prompt_tokens": row.prompt_tokens,
                          "finish_reason": reason}  # fmt: skip
                if row.top is not None:
                    self._logprob_piece(row)
                    result["logprobs"] = joined_docs(row.shaped)
                if row.prompt_top is not None:
                    result["prompt_logprobs"] = self._prompt_doc(row)
                row.sink.done(result)
                return
            except Exception as e:
                error = (INTERNAL, f"finishing this prompt failed: {type(e).__name__}: {e}"[:500])
        if error is not None:
            row.sink.fail(*error)

    def _with_prompt(self, row: Row, piece: dict[str, Any] | None) -> dict[str, Any] | None:
        """The first chunk of a row whose prompt was scored carries the prompt's scores too
        (`prompt`): an echoing stream sends them before the completion's first text."""
        if row.prompt_top is None or row.prompt_sent:
            return piece
        row.prompt_sent = True
        return {**(piece or {}), "prompt": self._prompt_doc(row)}

    def _logprob_piece(self, row: Row) -> dict[str, Any] | None:
        """The logprobs of the tokens a chunk of text completes, in the answer's shape (None: none
        asked, or none new). A token whose text is held back (half a character, what may become
        a stop string) comes with the next chunk; the answer joins every piece, each shaped once."""
        if row.top is None or row.n_shaped == len(row.logprobs):
            return None
        doc = self._logprob_doc(row.logprobs[row.n_shaped :])
        row.shaped.append(doc)
        row.n_shaped = len(row.logprobs)
        return doc

    def _logprob_doc(self, entries: list[Any]) -> dict[str, Any]:
        """The NDJSON shape: each counted token's text, id and logprob, and its alternatives."""
        return {
            "tokens": [self.decode([t]) for t, _, _ in entries],
            "token_ids": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [[{"id": i, "token": self.decode([i]), "logprob": v} for i, v in top]
                             for _, _, top in entries],
        }  # fmt: skip

    def _prompt_doc(self, row: Row) -> dict[str, Any]:
        """The NDJSON shape of a scored prompt: its text, and per token its text, id, logprob (the
        first token has none) and alternatives (the first has none)."""
        ids = row.prompt or []
        scored = [(None, None), *row.prompt_lps]
        return {
            "text": self.decode(ids),
            "tokens": [self.decode([t]) for t in ids],
            "token_ids": ids,
            "token_logprobs": [lp for lp, _ in scored],
            "top_logprobs": [None if top is None else [{"id": i, "token": self.decode([i]), "logprob": v}
                                                       for i, v in top] for _, top in scored],
        }  # fmt: skip

    def cancelled(self) -> None:
        """Rows whose request went away (client gone, time-out, cut off) leave at the next step."""
        for row in self.rows:
            if row.reason is None and row.sink.cancelled():
                self.end(row, "cancelled")

    def fail(self, code: str, message: str) -> None:
        """Answer every running row with an error (a lost rank, a failed forward, a hung rank)."""
        for row in self.rows + self.joining:
            if row.reason is None:
                self.end(row, "error", (code, message))
