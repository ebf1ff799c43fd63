"""The router's keeper and the rolling-restart ops, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dslaunch.node import agent, procs
from tests.conftest import job_pids

# A child that records its pid, then its start count (each file whole: the test reads them as they
# change), then crashes on its first run only.
CHILD = """
import os, sys, time, pathlib
d = pathlib.Path(sys.argv[1]); runs = d / "runs"
n = int(runs.read_text()) + 1 if runs.exists() else 1
def put(name, text):
    (d / f"{name}.tmp").write_text(text); os.replace(d / f"{name}.tmp", d / name)
put("child.pid", str(os.getpid())); put("runs", str(n))
if n == 1:
    os._exit(7)
time.sleep(600)
"""


# Dies young twice, then after a healthy run, then exits 0: the back-off grows, then starts again.
LOOPER = """
import pathlib, sys, time
runs = pathlib.Path(sys.argv[1]) / "runs"
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
if n == 3:
    time.sleep(float(sys.argv[2]))
sys.exit(0 if n == 4 else 3)
"""


def _wait(pred, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_supervisor_restarts_a_crashed_child_and_ends_with_it_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ, DSLAUNCH_NODE_DIR=str(tmp_path))
    sup = subprocess.Popen(
        [sys.executable, "-m", "dslaunch.node.supervise", "--", sys.executable, "-c", CHILD, str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait(lambda: (tmp_path / "runs").exists() and (tmp_path / "runs").read_text() == "2")
        state = json.loads((tmp_path / "supervisor.json").read_text())
        assert state["restarts"] == 1 and state["last_exit"] == 7
        child = int((tmp_path / "child.pid").read_text())
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(10) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
        assert not procs.alive(child), "the child ends with its supervisor"
        assert "exited with code 7" in (sup.stdout.read() if sup.stdout else "")
    finally:
        if sup.poll() is None:
            sup.kill()
        for p in [int((tmp_path / "child.pid").read_text())] if (tmp_path / "child.pid").exists() else []:
            if procs.alive(p):
                os.kill(p, signal.SIGKILL)


def test_the_backoff_it_logs_is_the_one_it_waits_and_a_healthy_run_resets_it(tmp_path: Path) -> None:
    from dslaunch.node import supervise

    env = dict(os.environ, DSLAUNCH_NODE_DIR=str(tmp_path))
    argv = [sys.executable, "-m", "dslaunch.node.supervise", "--", sys.executable, "-c", LOOPER, str(tmp_path),
            str(supervise.HEALTHY_S + 0.2)]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    delays = [line.rsplit(" ", 1)[1] for line in out.stdout.splitlines() if "restarting in" in line]
    # before: the third line still said 2s (the delay before the reset) and the wait was 0.5 s
    assert delays == ["0.5s", "1s", "0.5s"], out.stdout
    assert json.loads((tmp_path / "supervisor.json").read_text())["last_backoff_s"] == 0.5


def test_restart_op_stops_the_unit_and_starts_it_again_keeping_its_files(tmp_path: Path) -> None:
    jid = f"restart-{time.monotonic_ns()}"
    env = {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "3"}
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    args = {"job_id": jid, "node_rank": 3, "node_dir": str(tmp_path / "node3"), "env": env, "argv": sleeper,
            "files": {"replica.secret": "k"}}  # fmt: skip
    try:
        first = agent.op_start(args)
        (tmp_path / "node3" / "logs" / "rank0.log").write_text("kept\n")
        (tmp_path / "node3" / "ranks" / "rank1.attempt").write_text("4")  # the old agent's count
        again = agent.op_restart({"job_id": jid, "node_rank": 3, "node_dir": str(tmp_path / "node3"), "grace": 2})
        assert again["pid"] != first["pid"] and again["stopped"]["found"] >= 2
        assert not procs.alive(first["pid"]) and procs.is_job_process(again["pid"], jid, 3)
        assert (tmp_path / "node3" / "replica.secret").read_text() == "k"
        assert (tmp_path / "node3" / "logs" / "rank0.log").read_text() == "kept\n"
        assert not (tmp_path / "node3" / "ranks" / "rank1.attempt").exists(), "the new agent counts from 0"
        assert "files" not in json.loads((tmp_path / "node3" / agent.START_FILE).read_text())
        agent.op_drain({"node_dir": str(tmp_path / "node3"), "replicas": [1]})
        assert json.loads((tmp_path / "node3" / "drain").read_text()) == [1]
    finally:
        for p in job_pids(f"DSLAUNCH_JOB_ID={jid}"):
            os.kill(p, signal.SIGKILL)
