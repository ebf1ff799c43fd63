"""Every node's status as it changes: one `nodectl watch` stream per node instead of a poll.

A poll starts a Python interpreter on every node (and an SSH session) several times a second,
for the whole time a job loads: on a small machine that takes the CPU from the ranks being waited
for. A watch is one start-up per node; the node reads its own state files a few times a second
and writes a line when something changed, and a heartbeat line every second otherwise.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dslaunch.transport.nodes import Cluster, NodeClient

HEARTBEAT_S = 1.0
# a node that sent nothing for this long is asked once with a plain `status`, whose time-out and
# error (the connection is gone, the host is down) say what happened
STALL_S = 10.0
POLL_S = 0.5  # a node whose nodectl cannot watch is polled, as before


class NodeWatch:
    """The latest `status` answer of every node of a cluster, kept current by a thread per node.

    `wait()` returns as soon as any node's answer changed (or after its time-out). A node's
    failure is kept as an error string naming its host; the caller decides what it means.
    """

    def __init__(
        self, cluster: Cluster, args_for: Callable[[int, NodeClient], dict[str, Any]], max_s: float = 3600.0,
        only: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """Watch every node of the cluster, or the nodes at the indices in `only`."""
        self.cluster = cluster
        self.args_for = args_for
        self.max_s = max_s
        n = len(cluster.clients)
        self.latest: list[dict[str, Any] | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self._seen = [time.monotonic()] * n
        self._version = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.watched = list(range(n)) if only is None else sorted(set(only))
        self._threads = [threading.Thread(target=self._pump, args=(i,), daemon=True) for i in self.watched]

    def __enter__(self) -> NodeWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every stream; each thread ends at its node's next line (a second at most)."""
        self._stop.set()

    def wait(self, timeout: float) -> None:
        """Until some node's answer changed since the last call, or `timeout` seconds."""
        with self._cond:
            seen = self._version
            self._cond.wait_for(lambda: self._version != seen, timeout)
        self._check_stalled()

    # -- the threads ---------------------------------------------------------------------------
    def _set(self, i: int, answer: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self._cond:
            if answer is not None:
                self.latest[i] = answer
                self._seen[i] = time.monotonic()
            if error is not None:
                self.errors[i] = error
            self._version += 1
            self._cond.notify_all()

    def _pump(self, i: int) -> None:
        c = self.cluster.clients[i]
        args = {**self.args_for(i, c), "heartbeat": HEARTBEAT_S, "max_s": self.max_s}
        while not self._stop.is_set():
            lines = 0
            stream = c.stream("watch", args)
            try:
                for line in stream:
                    if self._stop.is_set():
                        return
                    self._set(i, json.loads(line))
                    lines += 1
            except Exception as e:  # the transport's own failure: the node is unreachable
                self._set(i, error=str(e))
                return
            finally:
                stream.close()
            if self._stop.is_set():
                return
            # the stream ended by itself: a plain status says whether the node is still there
            try:
                self._set(i, c.call("status", self.args_for(i, c)))
            except Exception as e:
                self._set(i, error=str(e))
                return
            if lines == 0:  # this node's nodectl does not stream its status: poll it
                self._poll(i, c)
                return

    def _poll(self, i: int, c: NodeClient) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._set(i, c.call("status", self.args_for(i, c)))
            except Exception as e:
                self._set(i, error=str(e))
                return

    def _check_stalled(self) -> None:
        """A node silent past STALL_S (its stream hangs: a cut network, not a closed connection)
        is asked directly; its error, or its time-out, becomes the node's error."""
        now = time.monotonic()
        for i in self.watched:
            c = self.cluster.clients[i]
            if self.errors[i] is None and now - self._seen[i] > STALL_S:
                try:
                    self._set(i, c.call("status", self.args_for(i, c)))
                except Exception as e:
                    self._set(i, error=str(e))
