"""`localhost` without sshd: the same node commands, run as child processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from dslaunch.errors import RemoteError
from dslaunch.transport.base import ConnectOptions, RunResult
from dslaunch.wire.envscrub import for_node_command
from dslaunch.wire.hosts import Node


def node_env() -> dict[str, str]:
    """The environment of a local node command: the CLI's, without its token or other credentials.

    nodectl passes its environment on to the job's agent, so anything left here would sit in
    `/proc/<pid>/environ` of every job process for as long as the job runs.
    """
    return for_node_command(os.environ)


class LocalTransport:
    """`localhost` without sshd: the same commands, run as child processes.

    Commands get `node_env()`, not the CLI's environment; the command itself keeps the working
    directory out of `sys.path` (see NodeClient.argv), as over SSH.
    """

    def __init__(self, node: Node, opts: ConnectOptions) -> None:
        self.node = node
        self.opts = opts
        self._streams: list[subprocess.Popen[str]] = []

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult:
        timeout = timeout or self.opts.command_timeout
        try:
            p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=node_env())
        except subprocess.TimeoutExpired:
            raise RemoteError(
                f"{self.node.host}: command did not finish within {timeout:g}s (--command-timeout)"
            ) from None
        except FileNotFoundError:
            return RunResult(127, "", f"{argv[0]}: not found")
        return RunResult(p.returncode, p.stdout, p.stderr)

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=node_env())
        self._streams.append(p)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(stdin)
        p.stdin.flush()
        try:
            yield from (line.rstrip("\n") for line in p.stdout)
        finally:
            self._end(p)

    @staticmethod
    def _end(p: subprocess.Popen[str]) -> None:
        if p.stdin:
            with contextlib.suppress(OSError):
                p.stdin.close()
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def address(self) -> str:
        return "127.0.0.1"

    def close(self) -> None:
        for p in self._streams:
            if p.poll() is None:
                self._end(p)
        self._streams.clear()
