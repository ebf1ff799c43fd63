"""Rank 0 leads, every other rank follows: the serving loops over the control channel.

Rank 0 sends a heartbeat whenever it has been idle for `heartbeat_s`, so the followers' receive
never reaches the collective time-out, and a follower that died shows up as a failed send on
rank 0 within one heartbeat. Generate jobs run step by step (`steps.lead_steps`): rows join and
leave the running batch at every step. Embed and handler jobs run whole batches.

The loop rule: an error while serving one step or batch answers the requests involved, and the
loop goes on. Only a failed collective (a lost peer, ranks out of step) ends a rank.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Protocol

from dslaunch.engine.base import Engine, Sink, Work
from dslaunch.rank.channel import BEAT, PROBE, RESTARTING, STEP, STOP, WORK, Channel, Message, Progress, peer_lost
from dslaunch.wire.protocol import INTERNAL, UNAVAILABLE

__all__ = ["RESTARTING", "Channel", "Progress", "follow", "lead", "peer_lost"]


class Batch(Sink, Protocol):
    """What the batcher hands rank 0's loop for a whole batch: the work, and where answers go."""

    work: Work

    def resolve(self, results: list[Any]) -> None: ...

    def fail(self, code: str, message: str) -> None: ...


class Source(Protocol):
    closed: bool

    def next_batch(self, timeout: float) -> Batch | bool | None:
        """A batch; False after `timeout` with nothing to do; None once closed."""
        ...

    def ran(self, batch: Batch, seconds: float, results: list[Any]) -> None: ...


def capacity(engine: Engine) -> int:
    """Rows per step: --max-batch-size, the same on every rank (all read the same ServeSpec)."""
    opts = getattr(getattr(engine, "ctx", None), "options", None)
    return int(getattr(opts, "max_batch_size", 8))


def probe(engine: Engine, channel: Channel) -> list[Any]:
    """Deep health: time a tiny forward on every rank."""
    t0 = time.perf_counter()
    engine.probe()
    me = {"rank": channel.rank, "host": socket.gethostname(), "ms": round((time.perf_counter() - t0) * 1000, 3)}
    return channel.gather(me)


def run_batch(engine: Engine, channel: Channel, batch: Batch) -> list[Any] | None:
    """Rank 0: send one whole batch to every rank and run it; None when it failed (answered).

    A failed collective answers `unavailable` and re-raises; any other error answers `internal`.
    """
    work = batch.work
    try:
        if work.kind == "probe":
            channel.send(Message(PROBE, 0))
            return probe(engine, channel)
        data = json.dumps({"kind": work.kind, "inputs": work.inputs}).encode()
        channel.send(Message(WORK, 0, payload=len(data)))
        channel.send_bytes(data)
    except BaseException:
        batch.fail(UNAVAILABLE, RESTARTING)
        raise
    try:
        return engine.run(work, batch) or []
    except BaseException as e:
        if peer_lost(e) or not isinstance(e, Exception):
            batch.fail(UNAVAILABLE, RESTARTING)
            raise
        batch.fail(INTERNAL, f"the batch failed: {type(e).__name__}: {e}"[:500])
        return None


def lead(engine: Engine, channel: Channel, source: Any, heartbeat_s: float) -> None:
    """Rank 0: run what the source hands out on every rank, answer; stop when the source closes."""
    channel.capacity = capacity(engine)
    if getattr(engine, "continuous", False):
        from dslaunch.rank.steps import lead_steps

        lead_steps(engine, channel, source, heartbeat_s)
        return
    while True:
        batch = source.next_batch(heartbeat_s)
        if batch is None:
            channel.send(Message(STOP, 0))
            return
        if batch is False:
            channel.send(Message(BEAT, 0))
            continue
        t0 = time.perf_counter()
        channel.progress.batch = batch
        results = run_batch(engine, channel, batch)
        channel.progress.batch = None
        source.ran(batch, time.perf_counter() - t0, results or [])
        if results is not None:
            batch.resolve(results)


def follow(engine: Engine, channel: Channel) -> None:
    """Every other rank: run whatever rank 0 sends until it says stop."""
    channel.capacity = capacity(engine)
    kv = engine.new_batch() if getattr(engine, "continuous", False) else None  # type: ignore[attr-defined]
    while True:
        msg = channel.recv()
        if msg.op == STOP:
            return
        if msg.op == STEP:
            assert kv is not None
            if kv.rows != msg.rows:
                raise RuntimeError(f"rank 0 steps {msg.rows} rows, this rank holds {kv.rows}: out of step")
            joins = _split(channel.recv_ids(msg.payload), msg.joins) if msg.joins else []
            leaving = set(msg.leave)
            keep = [i for i in range(msg.rows) if i not in leaving]
            _guarded(kv.step, (keep, msg.tokens, joins), kv.reset)
        elif msg.op == WORK:
            obj = json.loads(channel.recv_bytes(msg.payload))
            _guarded(engine.run, (Work(obj["kind"], obj["inputs"]), None), lambda: None)
        elif msg.op == PROBE:
            probe(engine, channel)


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in lengths:
        out.append(flat[at : at + n])
        at += n
    return out


def _guarded(fn: Any, args: tuple[Any, ...], reset: Any) -> None:
    """A follower's forward: a failed collective ends the rank; any other error is the same one
    rank 0 met and answered, so drop the work and go on."""
    try:
        import torch

        with torch.inference_mode():
            fn(*args)
    except Exception as e:
        if peer_lost(e):
            raise
        reset()
        print(f"a step failed on this rank too, dropped: {type(e).__name__}: {e}"[:500], flush=True)
