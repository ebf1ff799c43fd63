"""Rank 0's loop for generate jobs over the paged KV cache: one packed forward pass per step.

Every step the `Scheduler` (`engine/scheduler.py`, through `engine/packed.PackedBatch`) decides
what each row computes: every running row's next token, then chunks of joining prompts, within
`--max-step-tokens`, or fewer while rows decode where tokens cost time (`engine/stepcost.py`
keeps such a step within `--max-itl-ratio` decode steps). Rows are preempted (and recomputed
later) when the block pool runs out, and a joiner starts from the longest cached prefix of its
prompt. Rank 0 sends the step as one header and one flat int64 tensor (`StepLayout.flat`:
positions, block tables, tokens); every rank runs the same forward over its own identical pool,
and rank 0 samples the rows whose chunk reached their last token. Requests are taken from the
queue while rows are free (`--max-batch-size`); whether they fit in the pool is the scheduler's
call, counted in blocks.
"""

from __future__ import annotations

import time
from typing import Any

from dslaunch.engine.packed import PackedBatch
from dslaunch.engine.paged import PagedKV, StepLayout
from dslaunch.engine.scheduler import Plan
from dslaunch.engine.stepcost import StepCost
from dslaunch.rank.batches import probe_between
from dslaunch.rank.channel import BEAT, PACKED, RESTARTING, STOP, Channel, Message, peer_lost
from dslaunch.rank.steps import DRAIN_S, STOPPING
from dslaunch.wire.protocol import BAD_REQUEST, INTERNAL, UNAVAILABLE, ProtocolError


def lead_packed(engine: Any, channel: Channel, source: Any, heartbeat_s: float) -> None:
    """Rank 0: step the paged batch until the source closes and the rows are done."""
    kv: PagedKV = engine.new_batch()
    batch: PackedBatch = engine.packed()
    gen = batch.gen
    gen.observer = getattr(source, "times", None)  # request timings for the metrics (serving.reqtimes)
    channel.progress.batch = gen
    cost = StepCost(getattr(engine, "max_itl_ratio", 0.0))
    source.engine_stats(lambda: {**batch.stats(), "steps_capped": cost.capped})
    closing: float | None = None
    while True:
        gen.cancelled()
        batch.retire()
        source.running(len(batch))
        if source.closed:
            closing = closing or time.monotonic()
            if len(batch) and time.monotonic() - closing > DRAIN_S:
                gen.fail(UNAVAILABLE, STOPPING)
                continue
        if not len(batch):
            got = source.wait(heartbeat_s)
            if got is None:
                channel.send(Message(STOP, 0))
                return
            if got is False:
                channel.send(Message(BEAT, 0))
                continue
        if probe_between(engine, channel, source, gen):
            continue
        if not source.closed and len(batch) < batch.sched.max_rows:
            for job in source.admit(_Rows(engine, batch)):
                for i, ids in enumerate(job.req.ids):
                    batch.add(ids, job.req.params, job.row(i))
        plan = batch.plan(cost.cap(batch.sched.decoding(), batch.sched.step_tokens) if cost.ratio > 0 else None)
        if not plan.chunks:
            if batch.sched.stalled(plan):  # nothing could ever be placed: answer, do not spin
                gen.fail(INTERNAL, "no waiting row fits in the free KV blocks")
                batch.reset()
            continue
        with source.events_together():
            _step(channel, source, batch, kv, plan, cost)


def _step(channel: Channel, source: Any, batch: PackedBatch, kv: PagedKV, plan: Plan, cost: StepCost) -> bool:
    """One packed step on every rank; False when it failed on this rank (its rows are answered)."""
    import torch

    t0 = time.perf_counter()
    layout = StepLayout.of_plan(plan.chunks)
    flat = layout.flat()
    try:
        channel.send(Message(PACKED, 0, len(plan.chunks), payload=len(flat)))
        channel.send_ids(flat)
        with torch.inference_mode():
            logits = kv.step(layout)
    except BaseException as e:
        if peer_lost(e) or not isinstance(e, Exception):
            batch.gen.fail(UNAVAILABLE, RESTARTING)
            raise
        # the same error met every rank in the same forward: answer these rows, go on
        batch.gen.fail(INTERNAL, f"the step failed: {type(e).__name__}: {e}"[:500])
        batch.reset()
        return False
    made = batch.after(plan, logits)
    took = time.perf_counter() - t0
    if cost.ratio > 0:  # the cap is off by default: no fit to keep
        cost.observe(sum(len(c.tokens) for c in plan.chunks), took)
    source.stepped(len(plan.chunks), took, made, len(plan.joined), forwards=1)
    return True


class _Rows:
    """Admission from the queue: rows while `--max-batch-size` has room (the blocks are the
    scheduler's to count). A request whose rows could never fit is refused."""

    def __init__(self, engine: Any, batch: PackedBatch) -> None:
        self.engine, self.batch, self.taken = engine, batch, 0

    def __call__(self, job: Any) -> bool:
        if job.req.ids is None:
            self.engine.check(job.req)  # a request that did not come through the front's check
        cap = self.batch.sched.max_rows
        if len(job.req.ids) > cap:
            raise ProtocolError(BAD_REQUEST, f"this request has more rows than the job runs at once ({cap})")
        if len(self.batch) + self.taken + len(job.req.ids) > cap:
            return False
        self.taken += len(job.req.ids)
        return True
