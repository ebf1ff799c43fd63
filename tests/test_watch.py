"""`nodectl watch` and the launch host's NodeWatch, with real processes: a line when the state
changes, heartbeats while it does not, and an end when the reader goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dslaunch.launch.watch import NodeWatch
from dslaunch.node import agent
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.nodes import Cluster, NodeClient
from dslaunch.wire.hosts import Node
from tests.conftest import job_pids


def _start_agent(tmp_path: Path) -> tuple[str, dict]:
    jid = f"watch-{os.getpid()}-{time.monotonic_ns()}"
    args = {"job_id": jid, "node_rank": 0, "node_dir": str(tmp_path / "n0"),
            "argv": [sys.executable, "-c", "import time; time.sleep(600)"],
            "env": {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "0"}}  # fmt: skip
    agent.op_start(args)
    return jid, {k: args[k] for k in ("job_id", "node_rank", "node_dir")}


def _my_nodectls() -> list[int]:
    """This test process's nodectl children still running."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"dslaunch.node.ctl" in cmd:
            out.append(int(d.name))
    return out


def _kill(jid: str) -> None:
    for p in job_pids(f"DSLAUNCH_JOB_ID={jid}"):
        os.kill(p, signal.SIGKILL)


def test_watch_writes_changes_and_heartbeats_and_ends_with_its_reader(tmp_path: Path) -> None:
    jid, args = _start_agent(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dslaunch.node.ctl", "watch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**args, "every": 0.05, "heartbeat": 0.3}) + "\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())
        assert first["agent"]["alive"] is True
        second = json.loads(proc.stdout.readline())  # nothing changed: the heartbeat
        assert second["agent"]["alive"] is True
        _kill(jid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = json.loads(proc.stdout.readline())
            if not st["agent"]["alive"]:
                break
        assert not st["agent"]["alive"], "the agent's death is written"
        proc.stdout.close()  # the reader goes away: the next line fails and the watch ends
        assert proc.wait(timeout=10) == 0
    finally:
        _kill(jid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sees_the_agent_die(watch: NodeWatch, jid: str) -> None:
    """The watch shows the agent alive, then, once it is killed, dead; the node never errs."""
    deadline = time.monotonic() + 30
    while watch.latest[0] is None and time.monotonic() < deadline:
        watch.wait(1.0)
    assert watch.latest[0] is not None and watch.latest[0]["agent"]["alive"]
    _kill(jid)
    while watch.latest[0]["agent"]["alive"] and time.monotonic() < deadline:
        watch.wait(1.0)
    assert not watch.latest[0]["agent"]["alive"] and watch.errors == [None]


def test_node_watch_follows_a_node_until_closed(tmp_path: Path) -> None:
    jid, args = _start_agent(tmp_path)
    try:
        with (
            Cluster([Node("localhost", 1)], ConnectOptions(), sys.executable) as cluster,
            NodeWatch(cluster, lambda _i, _c: args, max_s=120) as watch,
        ):
            _sees_the_agent_die(watch, jid)
    finally:
        _kill(jid)
    deadline = time.monotonic() + 10
    while _my_nodectls() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _my_nodectls() == [], "the watch's nodectl ends once the watch is closed"


def test_node_watch_polls_a_node_that_cannot_watch(tmp_path: Path) -> None:
    """A node whose nodectl has no `watch` (another version) answers a plain `status`: polled."""
    jid, args = _start_agent(tmp_path)

    class OldNodeClient(NodeClient):
        def argv(self, op: str) -> list[str]:
            return super().argv("no-such-op" if op == "watch" else op)

    try:
        with Cluster([Node("localhost", 1)], ConnectOptions(), sys.executable) as cluster:
            old = cluster.clients[0]
            cluster.clients[0] = OldNodeClient(old.node, old.transport, old.python, old.timeout)
            with NodeWatch(cluster, lambda _i, _c: args, max_s=120) as watch:
                _sees_the_agent_die(watch, jid)
    finally:
        _kill(jid)
