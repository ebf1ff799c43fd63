"""Rank 0 leads, every other rank follows: the control channel and the two serving loops.

Control messages (work, heartbeat, stop) travel over a separate gloo group, never the NCCL
stream. Rank 0 sends a heartbeat whenever it has been idle for `heartbeat_s`, so the followers'
blocking receive never reaches the collective time-out, and a follower that died shows up as a
failed send on rank 0 within one heartbeat.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Protocol

from dslaunch.engine.base import Engine, Sink, Work
from dslaunch.wire.protocol import INTERNAL, UNAVAILABLE

WORK, BEAT, STOP = "work", "beat", "stop"
RESTARTING = "the job is restarting (a rank was lost); retry"


class Progress:
    """When this rank's serving loop last moved, and the batch it is running (rank 0).

    Stamped by every control message and every decode step. A rank stuck in a collective because
    a peer hangs (stopped, not dead: no socket closes, so no error ever comes) stops stamping; the
    worker's watchdog notices and ends the rank, which restarts the job.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.batch: Batch | None = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last


class Channel:
    """Broadcasts from rank 0 to all ranks over a gloo group (a no-op in a world of one)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, progress: Progress | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.progress = progress or Progress()
        self.group = None
        if world_size > 1:
            from datetime import timedelta

            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def send(self, msg: tuple[Any, ...]) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.broadcast_object_list([msg], src=0, group=self.group)
        self.progress.beat()

    def recv(self) -> tuple[Any, ...]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        self.progress.beat()
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class Batch(Sink, Protocol):
    """What the batcher hands rank 0's loop: the work, and where its answers go."""

    work: Work

    def resolve(self, results: list[Any]) -> None: ...

    def fail(self, code: str, message: str) -> None: ...


class Source(Protocol):
    def next_batch(self, timeout: float) -> Batch | bool | None:
        """A batch; False after `timeout` with nothing to do; None once closed."""
        ...

    def ran(self, batch: Batch, seconds: float, results: list[Any]) -> None: ...


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank went away (not an error of this rank's own)."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("connection", "closed by peer", "broken pipe"))


def execute(engine: Engine, channel: Channel, work: Work, sink: Sink | None) -> list[Any] | None:
    """Run one batch on this rank; `probe` (deep health) times a tiny forward on every rank."""
    if work.kind != "probe":
        return engine.run(work, sink)
    t0 = time.perf_counter()
    engine.probe()
    me = {"rank": channel.rank, "host": socket.gethostname(), "ms": round((time.perf_counter() - t0) * 1000, 3)}
    return channel.gather(me)


def lead(engine: Engine, channel: Channel, source: Source, heartbeat_s: float) -> None:
    """Rank 0: take batches, send each to every rank, run it, answer; stop when the source closes."""
    while True:
        batch = source.next_batch(heartbeat_s)
        if batch is None:
            channel.send((STOP,))
            return
        if batch is False:
            channel.send((BEAT,))
            continue
        assert not isinstance(batch, bool)
        t0 = time.perf_counter()
        channel.progress.batch = batch
        try:
            channel.send((WORK, batch.work))
            results = execute(engine, channel, batch.work, batch)
        except BaseException as e:
            # a failed collective leaves the ranks out of step: answer, then end this rank
            if peer_lost(e):
                batch.fail(UNAVAILABLE, RESTARTING)
            else:
                batch.fail(INTERNAL, f"the batch failed on rank 0: {type(e).__name__}: {e}"[:500])
            raise
        source.ran(batch, time.perf_counter() - t0, results or [])
        batch.resolve(results or [])
        channel.progress.batch = None


def follow(engine: Engine, channel: Channel) -> None:
    """Every other rank: run whatever rank 0 sends until it says stop."""
    while True:
        msg = channel.recv()
        if msg[0] == STOP:
            return
        if msg[0] == WORK:
            execute(engine, channel, msg[1], None)
