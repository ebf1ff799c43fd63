"""The per-rank entry point the torchrun agent starts: `python -m dslaunch.worker`.

Phases: prepare (log file, threads, parent-death signal) → rendezvous (process group, proven
with an all-reduce) → ready (status written, serve until told to stop) → shutdown (leave the
group). Each phase is written to the rank's status file so `dslaunch status` can show it.
"""

from __future__ import annotations

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

from dslaunch.nodectl import write_json_atomic

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


def _redirect_output(node_dir: Path, rank: int) -> None:
    """Append stdout/stderr to the rank's log (one file across restarts, with a marker line)."""
    logs = node_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd = os.open(logs / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
    from dslaunch.group import GroupConfig, with_agreed_attempt

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
        return _run(cfg, status, stop, threads)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        status.update(stage="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        traceback.print_exc()
        raise


def _run(cfg: Any, status: RankStatus, stop: StopFlag, threads: int | None) -> int:
    import torch

    from dslaunch.group import form_group, leave_group, prove_group

    if threads:
        torch.set_num_threads(threads)
    status.update(stage="rendezvous")
    print(f"forming the process group: {cfg.init_method} {cfg.url} backend={cfg.backend}", flush=True)
    form_group(cfg)
    total = prove_group(cfg)
    print(f"group ready: rank {cfg.rank}/{cfg.world_size}, all-reduce of ranks = {total}", flush=True)
    status.update(stage="ready", allreduce=total, **_memory(cfg.device))
    try:
        while not stop.event.wait(1.0):
            pass
    finally:
        print(f"stopping (signal {stop.signum})", flush=True)
        status.update(stage="stopping")
        leave_group()
    return 0


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
