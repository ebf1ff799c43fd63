"""Whole batches on every rank (embed and handler jobs, deep-health probes): rank 0 sends the
batch, every rank runs it. Also used between two steps of a generate job (a probe)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Protocol

from dslaunch.engine.base import Engine, Sink, Work
from dslaunch.rank.channel import PROBE, RESTARTING, WORK, Channel, Message, peer_lost
from dslaunch.wire.protocol import INTERNAL, UNAVAILABLE


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


def probe_between(engine: Any, channel: Channel, source: Any, gen: Any) -> bool:
    """A deep-health probe at the head of the queue runs between two steps."""
    batch = source.take_probe()
    if batch is None:
        return False
    channel.progress.batch = _Both(gen, batch)
    try:
        results = run_batch(engine, channel, batch)
    except BaseException:
        gen.fail(UNAVAILABLE, RESTARTING)
        raise
    finally:
        channel.progress.batch = gen
    if results is not None:
        batch.resolve(results)
    return True


class _Both:
    """What the hang watchdog answers while a probe runs: the probe and the running rows."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def fail(self, code: str, message: str) -> None:
        for part in self.parts:
            part.fail(code, message)
