"""The per-rank entry point the torchrun agent starts: `python -m dslaunch.worker`.

Phases: prepare (log file, threads, parent-death signal) → rendezvous (process group, proven
with an all-reduce) → ready (status written, serve until told to stop) → shutdown (leave the
group). Each phase is written to the rank's status file so `dslaunch status` can show it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from dslaunch.wire.jsonio import write_json_atomic

PR_SET_PDEATHSIG = 1


class RankStatus:
    """This rank's status file, `<node dir>/ranks/rank<R>.json`, rewritten atomically per change."""

    def __init__(self, node_dir: Path, base: dict[str, Any]) -> None:
        self.path = node_dir / "ranks" / f"rank{base['rank']}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = dict(base)

    def update(self, **fields: Any) -> None:
        self.data.update(fields, time=time.time())
        write_json_atomic(self.path, self.data)


LOG_ROTATE_BYTES = 64 << 20


def _redirect_output(node_dir: Path, rank: int) -> None:
    """Append stdout/stderr to the rank's log (one file across restarts, with a marker line).

    A log over LOG_ROTATE_BYTES at start-up becomes rank<R>.log.1 (one generation kept), so
    restarts never let it grow without bound.
    """
    logs = node_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"rank{rank}.log"
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, logs / f"rank{rank}.log.1")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the agent dies, so a killed agent never leaves orphans."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _threads() -> int | None:
    """Intra-op threads: OMP_NUM_THREADS as set by the user or by the node (cores ÷ local ranks)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class StopFlag:
    """Set by SIGTERM/SIGINT (sent by the agent on `down` or on a gang restart)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        self.event.set()


def main() -> int:
    from dslaunch.rank.group import GroupConfig, with_agreed_attempt

    cfg = GroupConfig.from_env()
    node_dir = Path(os.environ["DSLAUNCH_NODE_DIR"])
    _redirect_output(node_dir, cfg.rank)
    _die_with_parent()
    stop = StopFlag()
    threads = _threads()
    status = RankStatus(
        node_dir,
        {
            "rank": cfg.rank,
            "local_rank": cfg.local_rank,
            "node_rank": cfg.node_rank,
            "host": os.environ.get("DSLAUNCH_HOST", socket.gethostname()),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": cfg.device,
            "restarts": cfg.restart,
            "init_method": cfg.init_method,
            "backend": cfg.backend,
            "threads": threads,
            "started": time.time(),
        },
    )
    status.update(stage="starting")
    try:
        # inside the try and after the redirect: a failure to agree shows in status and the rank log
        cfg = with_agreed_attempt(cfg, node_dir)
        status.update(restarts=cfg.restart)
        print(f"--- rank {cfg.rank} pid {os.getpid()} attempt {cfg.restart} on {socket.gethostname()} ---", flush=True)
        if _back_off(cfg.restart, status, stop):
            return 0
        return _run(cfg, status, stop, threads)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        status.update(stage="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        traceback.print_exc()
        raise


def _back_off(attempt: int, status: RankStatus, stop: StopFlag) -> bool:
    """Wait before a repeated restart (--restart-backoff); True when stopped meanwhile."""
    from dslaunch.wire.serve import backoff_delay

    delay = backoff_delay(float(os.environ.get("DSLAUNCH_RESTART_BACKOFF", "0")), attempt)
    if not delay:
        return False
    print(f"backing off {delay:g}s before attempt {attempt}", flush=True)
    status.update(stage="backoff", backoff_s=delay)
    return stop.event.wait(delay)


def _run(cfg: Any, status: RankStatus, stop: StopFlag, threads: int | None) -> int:
    import torch

    from dslaunch.engine.loader import tiny_model
    from dslaunch.rank.group import form_group, prove_group
    from dslaunch.wire.serve import ServeSpec

    if threads:
        torch.set_num_threads(threads)
    serve = ServeSpec.from_json(os.environ.get("DSLAUNCH_SERVE", "{}"))
    if not serve.model and not serve.handler:
        tiny_model(_work_dir())
    status.update(stage="rendezvous")
    print(f"forming the process group: {cfg.init_method} {cfg.url} backend={cfg.backend}", flush=True)
    form_group(cfg)
    total = prove_group(cfg)
    print(f"group ready: rank {cfg.rank}/{cfg.world_size}, all-reduce of ranks = {total}", flush=True)
    status.update(stage="loading", allreduce=total)
    return _serve(cfg, serve, status, stop)


def _work_dir() -> Path:
    return Path(os.environ["DSLAUNCH_NODE_DIR"]).parent.parent


def _serve(cfg: Any, serve: Any, status: RankStatus, stop: StopFlag) -> int:
    """Load the engine on every rank, start the front on rank 0, run the lock-step loop.

    The loop runs in a thread so that this (main) thread stays free for signals: SIGTERM on
    `down` or a gang restart. Rank 0 then closes the front, answers what is queued with
    `unavailable`, finishes the running batch and tells every rank to stop. Other ranks never end
    on their own (an agent whose workers all exit 0 would leave the job); they wait for their signal.
    """
    from dslaunch.engine.base import EngineContext
    from dslaunch.engine.loader import load_engine
    from dslaunch.rank.group import leave_group
    from dslaunch.rank.lockstep import RESTARTING, Channel, Progress, follow, lead, peer_lost

    progress = Progress()
    node_dir = Path(os.environ["DSLAUNCH_NODE_DIR"])
    ctx = EngineContext(
        rank=cfg.rank,
        world_size=cfg.world_size,
        local_rank=cfg.local_rank,
        device=cfg.device,
        multi_node=int(os.environ.get("CROSS_SIZE", "1")) > 1,
        work_dir=_work_dir(),
        group=_default_group(),
        options=serve,
        beat=progress.beat,
    )
    t0 = time.monotonic()
    engine = load_engine(ctx.options, ctx)
    print(f"engine ready: task {engine.task}, model {engine.name}, {time.monotonic() - t0:.1f}s", flush=True)
    channel = Channel(cfg.rank, cfg.world_size, cfg.timeout_s, progress)
    ranks = channel.gather({"rank": cfg.rank, "host": socket.gethostname(), "device": cfg.device})
    heartbeat = min(serve.heartbeat_s, cfg.timeout_s / 3)
    front = None
    if cfg.rank == 0:
        front = _start_front(serve, engine, ranks, cfg, node_dir)
        target: Any = lambda: lead(engine, channel, front.batcher, heartbeat)  # noqa: E731
    else:
        target = lambda: follow(engine, channel)  # noqa: E731
    loop = _LoopThread(target)
    loop.start()
    status.update(stage="ready", front=front.address if front else None, **_memory(cfg.device))
    print("serving" + (f" on {front.address}" if front else ""), flush=True)
    # rank 0 judges first; the others only act when rank 0 itself hangs
    hang_limit = serve.hang_timeout * (1 if cfg.rank == 0 else 2) if cfg.world_size > 1 else 0
    progress.beat()
    while not stop.event.wait(0.5):
        if loop.error is not None:
            break
        if hang_limit and progress.idle_for() > hang_limit:
            _hung(progress, hang_limit, status, front)
    if loop.error is not None and peer_lost(loop.error) and stop.signum is None:
        # Another rank is gone. Its agent starts a new round and ours restarts every worker with
        # SIGTERM within moments; failing here too would count a second failure and make torchrun
        # restart the gang twice for one lost rank. Wait for that signal (bounded), then stop.
        print(f"lost a peer ({loop.error}); waiting for the agent's restart", flush=True)
        status.update(stage="waiting", error=f"lost a peer: {loop.error}"[:500])
        if front is not None:
            front.stop_accepting(RESTARTING)
        if stop.event.wait(PEER_LOSS_WAIT_S):
            loop.error = None
    if stop.signum is not None:
        print(f"stopping (signal {stop.signum})", flush=True)
        status.update(stage="stopping")
        if front is not None:
            front.stop_accepting()
        loop.join(STOP_WAIT_S)
    if front is not None:
        front.close()
    if loop.error is not None:
        raise loop.error
    if loop.is_alive():
        # still inside a collective with a rank that is gone: leaving the group would hang
        status.update(stage="stopped")
        sys.stdout.flush()
        os._exit(0)
    leave_group()
    status.update(stage="stopped")
    return 0


def _hung(progress: Any, limit: float, status: RankStatus, front: Any) -> None:
    """A peer is alive but not answering (stopped, stuck in a driver): no collective will ever fail.

    Answer the running batch and the queue with `unavailable`, then end this rank with an error:
    the agent restarts the gang, killing the stuck rank on its way. Leaving the group would hang.
    """
    from dslaunch.rank.lockstep import RESTARTING
    from dslaunch.wire.protocol import UNAVAILABLE

    why = f"no progress for {progress.idle_for():.0f}s (--hang-timeout {limit:g}): a rank of the job is not responding"
    print(f"hung: {why}; ending this rank so that the job restarts", flush=True)
    status.update(stage="failed", error=f"hung: {why}")
    if front is not None:
        batch = progress.batch
        if batch is not None:
            batch.fail(UNAVAILABLE, RESTARTING)
        front.stop_accepting(RESTARTING)
        front.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(HUNG_EXIT)


HUNG_EXIT = 75
STOP_WAIT_S = 8.0
PEER_LOSS_WAIT_S = 20.0


class _LoopThread(threading.Thread):
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


def _start_front(serve: Any, engine: Any, ranks: list[dict[str, Any]], cfg: Any, node_dir: Path) -> Any:
    from dslaunch.serving.batcher import Batcher
    from dslaunch.serving.config import FrontConfig
    from dslaunch.serving.front import Front
    from dslaunch.serving.openai_api import TextTools
    from dslaunch.serving.stats import Stats
    from dslaunch.wire.protocol import Limits

    secret = lambda name: (node_dir / name).read_text().strip() if (node_dir / name).exists() else None  # noqa: E731
    token = secret("front.token")
    fcfg = FrontConfig(
        bind=serve.bind,
        port=serve.port,
        limits=Limits(
            max_request_bytes=serve.max_request_bytes,
            max_prompts=serve.max_batch_size,
            max_new_tokens=serve.max_new_tokens,
        ),
        max_batch_size=serve.max_batch_size,
        batch_wait_ms=serve.batch_wait_ms,
        max_queue=serve.max_queue,
        request_timeout=serve.request_timeout,
        idle_timeout=serve.idle_timeout,
        max_connections=serve.max_connections,
        max_inflight=serve.max_inflight,
        write_timeout=serve.write_timeout,
        token=token or None,
        nonce=secret("front.nonce") or None,
        served_model_name=serve.served_model_name or Path(str(engine.name)).name,
    )
    stats = Stats()
    batcher = Batcher(fcfg, stats)
    info = {"world_size": cfg.world_size, "ranks": ranks, "restarts": cfg.restart, "model": engine.name,
            "task": engine.task}  # fmt: skip
    text = TextTools.of(engine)
    front = Front(fcfg, info, engine.check, batcher, stats, node_dir / "front.json", text)
    front.start()
    return front


def _default_group() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_initialized() else None


def _memory(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"gpu_mem_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1)}


def entry() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())


if __name__ == "__main__":
    entry()
