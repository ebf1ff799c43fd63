"""Keep one process running: `python -m dslaunch.node.supervise -- CMD ...` (the router's keeper).

The router is a single process holding the job's public port; if it crashes, this restarts it on
the same address. Back-off: 0.5 s, doubling to 10 s while the child keeps dying before it was
ready, and back to 0.5 s after a child that was: ready means it created the file named in
`held.READY_ENV` (the router does once it listens), or ran HEALTHY_S. A router killed however often is
back after the first back-off and its start-up; only a crash loop waits longer. A child that exits 0, or any
exit after SIGTERM/SIGINT (`down`), ends the supervisor with the child's code.
`supervisor.json` in the node directory says how often it restarted and why, for `status`.

Under a router's environment (RouterEnv) the supervisor binds the router's link port and public
port once, before the first child, and every child inherits the listening sockets
(`held.LISTEN_FDS_ENV`): between a router's death and its successor's start the ports stay this
job's, so nobody can take them, and connections made meanwhile wait in the backlog.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dslaunch.wire import held
from dslaunch.wire.jsonio import write_json_atomic
from dslaunch.wire.rankenv import NODE_DIR_ENV

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
HEALTHY_S = 5.0  # a child that ran this long was not a crash loop: the back-off starts again
BIND_PATIENCE_S = 10.0  # a port still held by a previous router (SIGKILLed supervisor) is waited for


def next_backoff(backoff: float, ran: float, was_ready: bool) -> float:
    """The delay before the next start: reset after a child that got ready, kept after a crash loop's."""
    return FIRST_BACKOFF_S if was_ready or ran >= HEALTHY_S else backoff


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
    try:
        socks = _hold(held.router_addresses(os.environ))
    except OSError as e:
        print(f"supervise: {e}", file=sys.stderr, flush=True)
        return 1
    ready = state_path.with_name("child.ready")
    env = {**os.environ, held.LISTEN_FDS_ENV: held.encode({a: s.fileno() for a, s in socks.items()}),
           held.READY_ENV: str(ready)}  # fmt: skip
    restarts, backoff = 0, FIRST_BACKOFF_S
    last: dict[str, Any] = {}
    while True:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            ready.unlink()
        child = subprocess.Popen(argv, env=env, pass_fds=[s.fileno() for s in socks.values()])
        _write(state_path, {"pid": os.getpid(), "child_pid": child.pid, "restarts": restarts, **last})
        code = child.wait()
        if stopping or code == 0:
            return code if code >= 0 else 128 - code
        ran = time.monotonic() - t0
        backoff = next_backoff(backoff, ran, ready.exists())
        why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"supervise: the child {why} after {ran:.1f}s; restarting in {backoff:g}s", flush=True)
        last = {"last_exit": code, "last_why": why, "last_time": time.time(), "last_backoff_s": backoff}
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(backoff * 2, MAX_BACKOFF_S)
        restarts += 1


def _hold(addresses: list[tuple[str, int]]) -> dict[str, socket.socket]:
    """Listening sockets for the child's addresses (only those that name exactly one address)."""
    out: dict[str, socket.socket] = {}
    for host, port in addresses:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if len(infos) != 1:
            continue  # a name with several addresses: the child binds them all itself, as before
        family, kind, proto, _, addr = infos[0]
        deadline = time.monotonic() + BIND_PATIENCE_S
        while True:
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
                sock.listen(128)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
                time.sleep(0.2)
        sock.set_inheritable(True)
        out[held.key(host, port)] = sock
    return out


def _write(path: Path, state: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        write_json_atomic(path, {**state, "time": time.time()})


if __name__ == "__main__":
    sys.exit(main())
