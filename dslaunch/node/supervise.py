"""Keep one process running: `python -m dslaunch.node.supervise -- CMD ...` (the router's keeper).

The router is a single process holding the job's public port; if it crashes, this restarts it on
the same address (back-off 0.5 s doubling to 10 s, reset after a minute of uptime). A child that
exits 0, or any exit after SIGTERM/SIGINT (`down`), ends the supervisor with the child's code.
`supervisor.json` in the node directory says how often it restarted and why, for `status`.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dslaunch.wire.jsonio import write_json_atomic
from dslaunch.wire.rankenv import NODE_DIR_ENV

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
HEALTHY_S = 60.0  # a child that ran this long resets the back-off


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m dslaunch.node.supervise -- CMD [ARG ...]", file=sys.stderr)
        return 2
    state_path = Path(os.environ.get(NODE_DIR_ENV, ".")) / "supervisor.json"
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    restarts, backoff = 0, FIRST_BACKOFF_S
    last: dict[str, Any] = {}
    while True:
        t0 = time.monotonic()
        child = subprocess.Popen(argv)
        _write(state_path, {"pid": os.getpid(), "child_pid": child.pid, "restarts": restarts, **last})
        code = child.wait()
        if stopping or code == 0:
            return code if code >= 0 else 128 - code
        ran = time.monotonic() - t0
        why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"supervise: the child {why} after {ran:.1f}s; restarting in {backoff:g}s", flush=True)
        last = {"last_exit": code, "last_why": why, "last_time": time.time()}
        backoff = FIRST_BACKOFF_S if ran > HEALTHY_S else backoff
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF_S)
        restarts += 1


def _write(path: Path, state: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        write_json_atomic(path, {**state, "time": time.time()})


if __name__ == "__main__":
    sys.exit(main())
