"""Test processes forked from one warm interpreter, as the product's agent forks its ranks.

A router-test replica (tests/routerkit.py) is a process of its own, killed and started again many
times a run; as a new interpreter each start imports torch, transformers and DeepSpeed again,
seconds of CPU on a 2-core machine that runs six test workers. Here one server per test worker
imports them once and forks each replica from that state (nothing in it has run a torch op or
started a thread, as in the agent). A child runs with exactly the environment, directory and log
it was given; `Forked` is its Popen-like handle: the server reports the child's exit status over
the connection the child was asked for on.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM = ("torch", "torch.distributed", "transformers", "transformers.modeling_utils", "deepspeed",
        "dslaunch.engine.loader", "dslaunch.rank.session", "dslaunch.rank.lockstep", "tests.routerkit")  # fmt: skip


class Forked:
    """What a test holds of a forked child: pid, poll, wait, signals (as subprocess.Popen)."""

    def __init__(self, sock: socket.socket, pid: int, args: str) -> None:
        self.sock, self.pid, self.args = sock, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                self._read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.sock.setblocking(True)
            self.sock.settimeout(timeout)
            try:
                self._read()
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        assert self.returncode is not None
        return self.returncode

    def _read(self) -> None:
        data = self.sock.recv(4)
        # the status, as Popen has it (-N: killed by signal N); nothing: the server itself ended
        self.returncode = struct.unpack("!i", data)[0] if len(data) == 4 else -signal.SIGKILL
        self.sock.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The warm interpreter, started on first use; `spawn` forks a child of it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.path = self.dir / "sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", str(self.path)], cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300  # imports: a minute or more on a loaded small machine
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the fork server did not start:\n{(self.dir / 'server.log').read_text()}")
            time.sleep(0.05)

    def spawn(self, target: str, env: dict[str, str], log: Path, cwd: Path = ROOT) -> Forked:
        """Fork a child that runs `target` ("module:function") with `env`, output to `log`."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        sock.sendall(json.dumps({"target": target, "env": env, "log": str(log), "cwd": str(cwd)}).encode() + b"\n")
        pid = struct.unpack("!i", _recv_exactly(sock, 4))[0]
        return Forked(sock, pid, target)

    def close(self) -> None:
        """End the server, then remove its socket and log: a run leaves nothing in /tmp."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


_SERVER: ForkServer | None = None


def server() -> ForkServer:
    """This test worker's fork server, ended as the worker exits (or, at the latest, a second
    after: it watches its parent)."""
    global _SERVER
    if _SERVER is None:
        _SERVER = ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("the fork server closed the connection")
        data += more
    return data


def _child(req: dict[str, Any]) -> None:
    """In the forked child: its own environment, directory and output, then the target."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    module, _, func = req["target"].partition(":")
    code = 0
    try:
        getattr(importlib.import_module(module), func)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(path: str) -> None:
    """Accept requests, fork a child for each, and report each child's exit status to its asker;
    end when the test worker that started this server does."""
    for name in WARM:
        importlib.import_module(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # exists once it accepts
    listener.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    askers: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _addr = listener.accept()
                req = json.loads(conn.makefile("rb").readline())
                pid = os.fork()
                if pid == 0:
                    for held in [listener, conn, *askers.values()]:
                        held.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _child(req)
                conn.sendall(struct.pack("!i", pid))
                askers[pid] = conn
            else:
                os.read(wake_r, 4096)
        while askers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = askers.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
                conn.close()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _serve(sys.argv[1])
