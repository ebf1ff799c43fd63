"""Finding and signalling a job's processes on this node by the marker in their environment.

Every process a job starts carries `DSLAUNCH_JOB_ID` and `DSLAUNCH_NODE_RANK`, so `stop` finds
exactly what this job started, whatever its process group, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from dslaunch.wire.rankenv import JOB_ENV, NODE_ENV


def alive(pid: int) -> bool:
    """True for a running (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[0]
    return state not in (b"Z", b"X")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _markers(jid: str, node_rank: int | str) -> set[bytes]:
    return {f"{JOB_ENV}={jid}".encode(), f"{NODE_ENV}={node_rank}".encode()}


def _carries(pid: int | str, want: set[bytes]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = set(f.read().split(b"\0"))
    except OSError:
        return False
    return want <= env


def is_job_process(pid: int, jid: str, node_rank: int | str) -> bool:
    """True when `pid` runs and carries this job's and node's marker.

    A pid read from a file (`agent.pid`) may have been reused by anything since, e.g. after a
    reboot: only a process that carries the marker is the job's.
    """
    return pid > 0 and _carries(pid, _markers(jid, node_rank)) and alive(pid)


def job_processes(jid: str, node_rank: int | str) -> list[int]:
    """Pids of live processes whose environment carries this job's and node's marker."""
    want = _markers(jid, node_rank)
    me = os.getpid()
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if _carries(entry.name, want) and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(jid: str, node_rank: int, deadline: float) -> list[int]:
    left = job_processes(jid, node_rank)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = job_processes(jid, node_rank)
    return left
