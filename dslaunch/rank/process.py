"""What a rank process needs before anything distributed: its log, its status file, its signals."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

from dslaunch.wire.jsonio import write_json_atomic
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.states import RankStage

PR_SET_PDEATHSIG = 1


class RankStatus:
    """This rank's status file (`ranks/rank<R>.json`), rewritten atomically on every change."""

    def __init__(self, nd: NodeDir, base: dict[str, Any]) -> None:
        self.path = nd.rank_status(base["rank"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = dict(base)

    def update(self, stage: RankStage | None = None, **fields: Any) -> None:
        if stage is not None:
            fields["stage"] = stage.value
        self.data.update(fields, time=time.time())
        write_json_atomic(self.path, self.data)


class LoadMeter:
    """The weights' loading progress in the status file: `{"read", "total", "rate"}` in bytes and
    bytes per second since loading began, so `up` and `status` show minutes of loading as they pass."""

    def __init__(self, status: RankStatus) -> None:
        self.status, self.t0 = status, time.monotonic()

    def __call__(self, read: int, total: int) -> None:
        rate = read / max(time.monotonic() - self.t0, 1e-3)
        self.status.update(load={"read": int(read), "total": int(total), "rate": round(rate)})


LOG_ROTATE_BYTES = 64 << 20


def redirect_output(nd: NodeDir, rank: int) -> None:
    """Append stdout/stderr to the rank's log (one file across restarts, with a marker line).

    A log over LOG_ROTATE_BYTES at start-up becomes rank<R>.log.1 (one generation kept), so
    restarts never let it grow without bound.
    """
    nd.logs.mkdir(parents=True, exist_ok=True)
    path = nd.rank_log(rank)
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(f"{path.name}.1"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the agent dies, so a killed agent never leaves orphans."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def threads() -> int | None:
    """Intra-op threads: OMP_NUM_THREADS as set by the user or by the node (cores ÷ local ranks)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class StopFlag:
    """Set by SIGTERM/SIGINT (sent by the agent on `down` or on a gang restart)."""

    received: int | None = None  # the first signal any flag of this process took (rank.torchrun reads it)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        StopFlag.received = StopFlag.received or signum
        self.event.set()


def memory(device: str) -> dict[str, Any]:
    """GPU memory in use on this rank's device, for `status` (nothing on CPU: RSS is read there)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"gpu_mem_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1)}
