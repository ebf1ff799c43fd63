"""One attempt of a rank once its group works: start serving, watch it, and stop it.

startup  load the engine on every rank, agree on the ranks' identities, start the front on
         rank 0, run the lock-step loop in a thread (the main thread stays free for signals)
watch    until a signal (`down`, a gang restart), a loop error, or no progress (a hung peer);
         how each ends the attempt is the gang-restart rule (`wire/restarts.py`, RankEnd)
shutdown rank 0 closes the front, answers what is queued with `unavailable`, finishes the running
         batch and tells every rank to stop; then the rank leaves the group. Other ranks never end
         on their own: an agent whose workers all exit 0 would leave the job.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dslaunch.rank.group import GroupConfig, leave_group
from dslaunch.rank.process import LoadMeter, RankStatus, StopFlag, memory
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.restarts import HUNG_EXIT, PEER_LOSS_WAIT_S, hang_limit
from dslaunch.wire.states import RankStage

STOP_WAIT_S = 8.0  # after SIGTERM, how long the running batch may take to finish


class Outcome(Enum):
    """Why `watch` returned."""

    SIGNALLED = "signalled"  # SIGTERM/SIGINT: stop cleanly
    LOOP_FAILED = "loop_failed"  # the loop raised (a lost peer, once the wait for a signal ran out)


class LoopThread(threading.Thread):
    """The serving loop; its exception (a failed collective, a dead peer) ends the rank."""

    def __init__(self, target: Any) -> None:
        super().__init__(name="dslaunch-loop", daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:
            self.error = e


@dataclass
class Session:
    cfg: GroupConfig
    node: NodeEnv
    nd: NodeDir
    status: RankStatus
    stop: StopFlag
    progress: Any  # lockstep.Progress
    loop: LoopThread
    front: Any = None  # serving.front.Front on rank 0


def startup(cfg: GroupConfig, node: NodeEnv, nd: NodeDir, status: RankStatus, stop: StopFlag) -> Session:
    """Load the engine, start the front on rank 0 and the lock-step loop; the rank is then ready."""
    from dslaunch.engine.base import EngineContext
    from dslaunch.engine.loader import load_engine
    from dslaunch.rank.lockstep import Channel, Progress, follow, lead

    serve = node.serve
    progress = Progress()
    ctx = EngineContext(
        rank=cfg.rank, world_size=cfg.world_size, local_rank=cfg.local_rank, device=cfg.device,
        multi_node=node.nnodes > 1, work_dir=nd.work_dir, group=_default_group(), options=serve,
        beat=progress.beat, load_progress=LoadMeter(status),
    )  # fmt: skip
    channel = Channel(cfg.rank, cfg.world_size, cfg.timeout_s, progress)
    t0 = time.monotonic()
    engine = checked(channel, "loading the model", lambda: load_engine(ctx.options, ctx))
    # one real forward on every rank before ready: a family sharded wrongly fails here, named
    checked(channel, "the first forward", engine.probe)
    kv = getattr(engine, "kv_path", None)
    print(f"engine ready: task {engine.task}, model {engine.name}, {time.monotonic() - t0:.1f}s"
          + (f", KV cache {kv}" if kv else ""), flush=True)  # fmt: skip
    ranks = channel.gather({"rank": cfg.rank, "host": socket.gethostname(), "device": cfg.device})
    heartbeat = min(serve.heartbeat_s, cfg.timeout_s / 3)
    front = None
    if cfg.rank == 0:
        front = start_front(node, engine, ranks, cfg, nd)
        target: Any = lambda: lead(engine, channel, front.batcher, heartbeat)  # noqa: E731
    else:
        target = lambda: follow(engine, channel)  # noqa: E731
    loop = LoopThread(target)
    loop.start()
    pool = getattr(engine, "pool_size", None)  # the paged KV pool: its tokens, MiB, and what sized it
    status.update(RankStage.READY, front=front.address if front else None, **memory(cfg.device),
                  **({"kv": pool.status()} if pool is not None else {}))  # fmt: skip
    print("serving" + (f" on {front.address}" if front else ""), flush=True)
    return Session(cfg, node, nd, status, stop, progress, loop, front)


class PeerFailedStartup(RuntimeError):
    """Another rank's start-up step failed while this one's worked: that rank is the cause."""


class SameOnEveryRank(RuntimeError):
    """A start-up step failed identically on every rank: a restart would fail the same way."""

    retry = False


def checked(channel: Any, what: str, step: Any) -> Any:
    """Run a start-up step on every rank and compare the outcomes (one gather over gloo).

    The same error everywhere (a family DeepSpeed cannot shard, a broken checkpoint) raises
    SameOnEveryRank, which ends the job instead of restarting it; a rank whose step worked while
    another's failed raises PeerFailedStartup, naming that rank: it waits for the agent's restart
    rather than fail too, so the failing rank stays the cause `status` shows.
    """
    result, error = None, None
    try:
        result = step()
    except Exception as e:
        error = f"{type(e).__name__}: {e}".strip()[:1000]
    errors = channel.gather(error)
    if not any(errors):
        return result
    if all(e == errors[0] for e in errors):
        raise SameOnEveryRank(f"{what} failed the same way on every rank: {errors[0]}")
    first = next(i for i, e in enumerate(errors) if e)
    why = f"{what} failed on rank {first}: {errors[first]}"
    if error is None:
        raise PeerFailedStartup(why)  # an effect: the failing rank's own exit restarts the job
    raise RuntimeError(why)


def watch(s: Session) -> Outcome:
    """Wait for a signal or a loop error; end the rank (exit 75) when the job stops making progress."""
    from dslaunch.rank.lockstep import RESTARTING, peer_lost

    cfg, loop, stop = s.cfg, s.loop, s.stop
    # rank 0 judges first; the others only act when rank 0 itself hangs
    limit = hang_limit(s.node.serve.hang_timeout, cfg.rank, cfg.world_size)  # RankEnd.HUNG
    s.progress.beat()
    while not stop.event.wait(0.5):
        if loop.error is not None:
            break
        if limit and s.progress.idle_for() > limit:
            hung(s, limit)
    if loop.error is not None and peer_lost(loop.error) and stop.signum is None:
        # Another rank is gone. Its agent starts a new round and ours restarts every worker with
        # SIGTERM within moments; failing here too would count a second failure and make torchrun
        # restart the gang twice for one lost rank. Wait for that signal (bounded), then stop.
        print(f"lost a peer ({loop.error}); waiting for the agent's restart", flush=True)
        s.status.update(RankStage.LOST_PEER, error=f"lost a peer: {loop.error}"[:500])
        if s.front is not None:
            s.front.stop_accepting(RESTARTING)
        if stop.event.wait(PEER_LOSS_WAIT_S):
            loop.error = None
    return Outcome.SIGNALLED if stop.signum is not None and loop.error is None else Outcome.LOOP_FAILED


def shutdown(s: Session, outcome: Outcome) -> int:
    """Stop serving and leave the group; raise the loop's error when that is why we stop."""
    loop = s.loop
    if s.stop.signum is not None:
        print(f"stopping (signal {s.stop.signum})", flush=True)
        s.status.update(RankStage.STOPPING)
        if s.front is not None:
            s.front.stop_accepting()
        loop.join(STOP_WAIT_S)
    if s.front is not None:
        s.front.close()
    if outcome is Outcome.LOOP_FAILED and loop.error is not None:
        raise loop.error
    if loop.is_alive():
        # still inside a collective with a rank that is gone: leaving the group would hang
        s.status.update(RankStage.STOPPED)
        sys.stdout.flush()
        os._exit(0)
    leave_group()
    s.status.update(RankStage.STOPPED)
    return 0


def hung(s: Session, limit: float) -> None:
    """A peer is alive but not answering (stopped, stuck in a driver): no collective will ever fail.

    Answer the running batch and the queue with `unavailable`, then end this rank with an error:
    the agent restarts the gang, killing the stuck rank on its way. Leaving the group would hang.
    """
    from dslaunch.rank.lockstep import RESTARTING
    from dslaunch.wire.protocol import UNAVAILABLE

    idle = s.progress.idle_for()
    why = f"no progress for {idle:.0f}s (--hang-timeout {limit:g}): a rank of the job is not responding"
    print(f"hung: {why}; ending this rank so that the job restarts", flush=True)
    s.status.update(RankStage.FAILED, error=f"hung: {why}")
    if s.front is not None:
        batch = s.progress.batch
        if batch is not None:
            batch.fail(UNAVAILABLE, RESTARTING)
        s.front.stop_accepting(RESTARTING)
        s.front.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(HUNG_EXIT)


def start_front(node: NodeEnv, engine: Any, ranks: list[dict[str, Any]], cfg: GroupConfig, nd: NodeDir) -> Any:
    """Rank 0's front, configured from the job's ServeSpec; the token comes from its 0600 file.

    With routers (`node.routers`), the front listens on no port: it dials every router's link and
    serves each of them, proving the replica key from its 0600 file."""
    from dslaunch.serving.batcher import Batcher
    from dslaunch.serving.config import FrontConfig
    from dslaunch.serving.front import Front
    from dslaunch.serving.openai_api import TextTools
    from dslaunch.serving.stats import Stats

    secret = lambda p: (p.read_text().strip() or None) if p.exists() else None  # noqa: E731
    model_name = Path(str(engine.name)).name
    fcfg = FrontConfig.from_serve(node.serve, secret(nd.front_token), secret(nd.front_nonce), model_name)
    stats = Stats()
    batcher = Batcher(fcfg, stats)
    info = {"world_size": cfg.world_size, "ranks": ranks, "restarts": cfg.restart, "model": engine.name,
            "task": engine.task, "kv_cache": getattr(engine, "kv_path", None)}  # fmt: skip
    dial = None
    if node.routers:  # behind the job's routers: dial each of them instead of listening publicly
        from dslaunch.serving.link import Dialer

        key = secret(nd.replica_secret)
        if key is None:
            raise RuntimeError(f"no replica key in {nd.replica_secret}: cannot link to the router")
        hello = {"replica": node.replica, "attempt": cfg.restart, "ranks": cfg.world_size, "model": str(engine.name),
                 "task": engine.task, "max_batch_size": node.serve.max_batch_size,
                 "kv_cache": getattr(engine, "kv_path", None)}  # fmt: skip
        dial = Dialer(list(node.routers), key, hello)
    front = Front(fcfg, info, engine.check, batcher, stats, nd.front_status, TextTools.of(engine), dial=dial)
    front.start()
    return front


def _default_group() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_initialized() else None
