"""Rank 0's rows of the paged engine: the `Scheduler`'s decisions and `Generation`'s rows, kept
together. Each step: `plan()` (what every rank computes), the forward pass, then `after()`
(commit the plan, choose the sampled rows' next tokens, retire the rows that finished)."""

from __future__ import annotations

import itertools
from typing import Any

from dslaunch.engine.base import RowSink
from dslaunch.engine.generation import Generation, Row
from dslaunch.engine.scheduler import Plan, Scheduler
from dslaunch.wire.protocol import GenParams


class PackedBatch:
    """The scheduler and the rows it schedules, by key; `gen.rows` lists them (for `fail`)."""

    def __init__(self, gen: Generation, sched: Scheduler) -> None:
        self.gen, self.sched = gen, sched
        self.rows: dict[int, Row] = {}
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ids: list[int], params: GenParams, sink: RowSink) -> Row:
        row = self.gen.row(ids, params, sink)
        key = next(self._keys)
        self.sched.add(key, ids, row.budget, every=row.prompt_top is not None)
        self.rows[key] = row
        self.gen.rows.append(row)
        return row

    def plan(self, budget: int | None = None) -> Plan:
        return self.sched.schedule(budget)

    def after(self, plan: Plan, logits: Any) -> int:
        """The plan's forward ran: its logits are the kept ones (`PagedKV.step`). Prompts being
        scored take theirs, the sampled rows choose their next token. Returns the number of tokens
        generated."""
        self.sched.commit(plan)
        if any(c.every for c in plan.chunks):
            logits = self._score(plan, logits)
        sampled = [c.key for c in plan.chunks if c.sample]
        keep = [i for i, k in enumerate(sampled) if not self.rows[k].score_only]
        for k in sampled:
            if self.rows[k].score_only:
                self.gen.end(self.rows[k], "length")  # its prompt is scored; nothing to generate
        if len(keep) < len(sampled):
            logits = logits[keep]
        keys = [sampled[i] for i in keep]
        made = self.gen.choose_next([self.rows[k] for k in keys], logits) if keys else 0
        for k in keys:
            row = self.rows[k]
            if row.reason is None:
                self.sched.append(k, row.next_token)
        self.retire()
        return made

    def _score(self, plan: Plan, logits: Any) -> Any:
        """Give each scored chunk its rows of `logits`; return the sampled chunks' rows."""
        sampled, at = [], 0
        for c in plan.chunks:
            n = len(c.tokens) if c.every else int(c.sample)
            if c.every:
                self.gen.score_prompt(self.rows[c.key], c.start, logits[at : at + n])
            if c.sample:
                sampled.append(at + n - 1)
            at += n
        return logits[sampled]

    def retire(self) -> None:
        """Rows that finished or went away leave: their blocks go back to the pool."""
        for key, row in list(self.rows.items()):
            if row.reason is not None:
                self.sched.finish(key)
                del self.rows[key]
        self.gen.rows = list(self.rows.values())

    def reset(self) -> None:
        """After a failed step (its rows were answered): nothing runs, every block is free."""
        self.sched.reset()
        self.rows.clear()
        self.gen.rows = []

    def stats(self) -> dict[str, Any]:
        return {"kv_cache": "paged", **self.sched.stats()}
