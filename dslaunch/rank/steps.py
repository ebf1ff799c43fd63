"""Rank 0's loop for generate jobs: continuous (iteration-level) batching.

Every step rank 0 decides who leaves (rows that finished at the last step, or whose request went
away), which tokens the others are fed, and who joins (queued requests that fit in the free rows
and KV-cache tokens), and sends it all in one control message. Every rank then applies the same
step to its KV cache; rank 0 samples the next tokens, streams text and answers each finished
row at once. A request therefore never waits for a batch to drain, and a finished row never
costs another forward pass.
"""

from __future__ import annotations

import time
from typing import Any

from dslaunch.rank.batches import probe_between
from dslaunch.rank.channel import BEAT, RESTARTING, STEP, STOP, Channel, Message, peer_lost
from dslaunch.wire.protocol import BAD_REQUEST, INTERNAL, UNAVAILABLE, ProtocolError

# Joining costs a prefill forward pass of its own, and a small model (or any model decoding a
# small batch) is bound by reading its weights: a prefill costs about as much as a decode step.
# So while rows run, queued requests may wait up to JOIN_AFTER_STEPS steps to join together
# with others: while running rows will finish within that time (their clients, or the next
# requests, then join in the same prefill), or while they are fewer than JOIN_RATIO of the
# running rows (as TGI's waiting_served_ratio). Never when they already fill the free rows.
JOIN_RATIO = 0.3
JOIN_AFTER_STEPS = 8
# After the front closes (down, restart), running rows may finish for this long; then they are
# answered `unavailable` (the worker waits 8 s for this loop before it leaves anyway).
DRAIN_S = 5.0
STOPPING = "the job is stopping; retry"


def lead_steps(engine: Any, channel: Channel, source: Any, heartbeat_s: float) -> None:
    """Rank 0: step the running batch until the source closes and the rows are done."""
    kv, gen = engine.new_batch(), engine.generation()
    gen.observer = getattr(source, "times", None)  # request timings for the metrics (serving.reqtimes)
    channel.progress.batch = gen
    source.engine_stats(lambda: {"kv_cache": "padded"})
    closing: float | None = None
    held = 0  # steps queued requests have been held back to join together

    while True:
        gen.cancelled()
        running = sum(1 for r in gen.rows if r.reason is None)
        source.running(running)
        if source.closed:
            closing = closing or time.monotonic()
            if running and time.monotonic() - closing > DRAIN_S:
                gen.fail(UNAVAILABLE, STOPPING)
                continue
        if not gen.rows:
            got = source.wait(heartbeat_s)
            if got is None:
                channel.send(Message(STOP, 0))
                return
            if got is False:
                channel.send(Message(BEAT, 0))
                continue
        if probe_between(engine, channel, source, gen):
            continue
        if source.closed:
            joins = []
        elif _hold(gen, running, source.queued_rows(), channel.capacity - running, held):
            joins, held = [], held + 1
        else:
            joins, held = source.admit(Admission(engine, channel.capacity, gen.costs())), 0
        if not gen.rows and not joins:
            continue
        with source.events_together():
            if not _step(channel, source, gen, kv, joins):
                kv.reset()


def _step(channel: Channel, source: Any, gen: Any, kv: Any, joins: list[Any]) -> bool:
    """One step on every rank; False when it failed on this rank (its rows are answered)."""
    import torch

    t0 = time.perf_counter()
    keep, tokens = gen.survivors()
    new = [gen.row(ids, job.req.params, job.row(i)) for job in joins for i, ids in enumerate(job.req.ids)]
    prompts = [ids for job in joins for ids in job.req.ids]
    gen.joining = new  # a rank that hangs in this step: the watchdog answers these rows too
    kept = set(keep)
    leave = [i for i in range(len(gen.rows)) if i not in kept]
    msg = Message(STEP, 0, len(gen.rows), leave, tokens, [len(p) for p in prompts], sum(map(len, prompts)))
    try:
        channel.send(msg)
        if prompts:
            channel.send_ids([t for p in prompts for t in p])
        with torch.inference_mode():
            logits = kv.step(keep, tokens, prompts)
    except BaseException as e:
        gen.advance(keep, new, None)
        if peer_lost(e) or not isinstance(e, Exception):
            gen.fail(UNAVAILABLE, RESTARTING)
            raise
        # the same error met every rank in the same forward: answer these rows, go on
        gen.fail(INTERNAL, f"the step failed: {type(e).__name__}: {e}"[:500])
        gen.rows = []
        return False
    made = gen.advance(keep, new, logits)
    source.stepped(len(keep) + len(new), time.perf_counter() - t0, made, len(new))
    return True


def _hold(gen: Any, running: int, queued: int, free: int, held: int) -> bool:
    """Whether queued requests wait one more step to join together with others (see JOIN_RATIO)."""
    if not running or not queued or queued >= free or held >= JOIN_AFTER_STEPS:
        return False
    left = JOIN_AFTER_STEPS - held
    return any(n <= left for n in gen.remaining()) or queued < JOIN_RATIO * running


class Admission:
    """Whether a queued request fits in the running batch, counting what the left-padded KV cache
    really holds: rows x the longest row's cost (prompt + max_new_tokens) <= --max-batch-tokens,
    and rows <= --max-batch-size. A request that cannot fit even alone is refused."""

    def __init__(self, engine: Any, rows: int, costs: list[int]) -> None:
        self.engine, self.cap = engine, rows
        self.rows, self.top = len(costs), max(costs, default=0)

    def __call__(self, job: Any) -> bool:
        if job.req.ids is None:
            self.engine.check(job.req)  # a request that did not come through the front's check
        costs = [self.engine.cost(len(ids), job.req.params) for ids in job.req.ids]
        bound = self.engine.max_batch_tokens
        if len(costs) > self.cap or len(costs) * max(costs) > bound:
            raise ProtocolError(BAD_REQUEST, f"this request needs more KV cache than the job allows ({bound} tokens)")
        rows, top = self.rows + len(costs), max(self.top, *costs)
        if rows > self.cap or rows * top > bound:
            return False
        self.rows, self.top = rows, top
        return True
