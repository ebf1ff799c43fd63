"""Node-side control with real processes: start detached, find by marker, stop, verify, clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslaunch.errors import NodeOpError
from dslaunch.node import agent, procs, report
from tests.conftest import job_pids

# An "agent" that starts a child which escapes into its own session, like torchrun's workers do.
AGENT = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True);"
    "time.sleep(600)"
)


def _args(jid: str, node_dir: Path, argv: list[str]) -> dict:
    env = {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "0"}
    return {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir), "argv": argv, "env": env}


@pytest.fixture
def started(tmp_path: Path):
    jid = f"test-{os.getpid()}-{time.monotonic_ns()}"
    args = _args(jid, tmp_path / "n0", [sys.executable, "-c", AGENT])
    out = agent.op_start(args)
    try:
        yield jid, args, out
    finally:
        for p in job_pids(f"DSLAUNCH_JOB_ID={jid}"):
            os.kill(p, signal.SIGKILL)


def _wait_count(jid: str, n: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = procs.job_processes(jid, 0)
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    return procs.job_processes(jid, 0)


def test_start_detaches_and_stop_removes_every_marked_process(started, tmp_path: Path) -> None:
    jid, args, out = started
    assert "pid" in out, out
    pids = _wait_count(jid, 3)  # shell wrapper, agent, escaped child
    assert len(pids) == 3
    assert os.getsid(out["pid"]) == out["pid"], "the agent runs in its own session"
    # same job id on another node rank, and an unrelated process: both must survive
    other_env = dict(os.environ, DSLAUNCH_JOB_ID=jid, DSLAUNCH_NODE_RANK="1")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=other_env)
    try:
        st = report.op_status({**args, "tail": 5})
        assert st["agent"]["alive"] and st["procs"] == 3
        res = agent.op_stop({**args, "grace": 2})
        assert res["survivors"] == [] and res["found"] == 3 and res["removed"]
        assert job_pids(f"DSLAUNCH_JOB_ID={jid}") == [other.pid]
        assert not (tmp_path / "n0").exists()
        assert other.poll() is None, "a process of another node must not be touched"
    finally:
        other.kill()
        other.wait()


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    jid = f"stubborn-{time.monotonic_ns()}"
    ready = tmp_path / "ignoring"
    code = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)"
    )
    args = _args(jid, tmp_path / "n", [sys.executable, "-c", code, str(ready)])
    assert "pid" in agent.op_start(args)
    try:
        # stop only once the process ignores SIGTERM: a loaded machine can take seconds to get there
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stubborn process never started"
        res = agent.op_stop({**args, "grace": 1, "keep_logs": True})
        assert res["survivors"] == [] and res["killed"] >= 1
        assert (tmp_path / "n" / "agent.log").exists(), "--keep-logs keeps the logs"
        assert not (tmp_path / "n" / "agent.pid").exists()
    finally:
        for p in job_pids(f"DSLAUNCH_JOB_ID={jid}"):
            os.kill(p, signal.SIGKILL)


def test_agent_that_dies_at_once_is_reported(tmp_path: Path) -> None:
    args = {"job_id": "x-1", "node_rank": 0, "node_dir": str(tmp_path / "n"),
            "argv": ["/nonexistent/python", "-m", "x"], "env": {}}  # fmt: skip
    with pytest.raises(NodeOpError, match="the agent exited at once") as e:
        agent.op_start(args)
    assert any("nonexistent" in line for line in e.value.details["log"])


def test_status_of_a_missing_node_dir(tmp_path: Path) -> None:
    st = report.op_status({"node_dir": str(tmp_path / "none"), "job_id": "nope-1", "node_rank": 0})
    assert st["present"] is False and st["procs"] == 0


def test_cli_entry_speaks_json(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dslaunch.node.ctl", "probe"], input=json.dumps({"ports": [None, None]}) + "\n",
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    out = json.loads(res.stdout)
    assert out["dslaunch"] and out["cpus"] >= 1 and len(set(out["ports"])) == 2
    # below the ephemeral range: no connect() on the node can be handed one as its source port
    # between the probe and rank 0's bind
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(1024 <= p < low for p in out["ports"]), out["ports"]
    bad = subprocess.run([sys.executable, "-m", "dslaunch.node.ctl", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_agent_failure_summary_keeps_worker_words_and_root_cause() -> None:
    log = [
        "W1123 09:17:02.4 1 api.py:1] warning",
        "Traceback (most recent call last):",
        '  File "w.py", line 1',
        "ValueError: the real problem",
        "E1123 09:17:02.4 1 api.py:1] failed",
        "Traceback (most recent call last):",
        '  File "/x/torch/distributed/run.py", line 1, in <module>',
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: 5)",
        "=======",
    ]
    got = report.agent_failure(log)
    assert "ValueError: the real problem" in got
    assert "root cause: exitcode : 1 (pid: 5)" in got
    assert not any("torch/distributed/run.py" in g for g in got)
    # the agent's own failure (no worker ran, no root cause block): its exception, one line
    own = report.agent_failure([
        "[2026-12-02 17:05:59,101] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        "Traceback (most recent call last):",
        '  File "/x/dslaunch/rank/torchrun.py", line 92, in _continue_before_close',
        "    join = spawn.ProcessContext._join_procs_with_timeout",
        "           ^^^^^^^^^^^^^^^^^^^^",
        "AttributeError: 'function' object has no attribute 'ProcessContext'",
    ])  # fmt: skip
    assert own[-1] == "agent error: AttributeError: 'function' object has no attribute 'ProcessContext'", own


def test_start_refuses_a_port_taken_since_pre_flight(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:  # someone else took the master port between probe and start
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        jid = f"test-{os.getpid()}-{time.monotonic_ns()}"
        args = _args(jid, tmp_path / "n0", [sys.executable, "-c", AGENT])
        args["free_ports"] = {"master port (--master-port)": port}
        with pytest.raises(NodeOpError) as e:
            agent.op_start(args)
    assert e.value.message == (f"master port (--master-port) {port} was taken after pre-flight; "
                               "run 'up' again to pick free ports")  # fmt: skip
    assert procs.job_processes(jid, 0) == [], "nothing was started"


def test_worker_failures_name_the_rank_its_exit_and_its_last_words(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank1.log").write_text(
        "--- rank 1 pid 100 attempt 0 on n1 ---\nserving\n"
        "--- rank 1 pid 200 attempt 1 on n1 ---\nTraceback (most recent call last):\n"
        "RuntimeError: out of cheese\n"
        "W1123 12:41:00.100000 7 torch/x.py:1] noise\n"
        "--- rank 1 pid 300 attempt 2 on n1 ---\nserving\n"
    )
    agent = [
        "E1123 12:40:56.783000 1439 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9)"
        " local_rank: 0 (pid: 100) of binary: /usr/bin/python",
        "some other line",
        "E1123 12:41:02.001000 1439 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)"
        " local_rank: 0 (pid: 200) of binary: /usr/bin/python",
    ]
    got = report.worker_failures(agent, logs)
    assert got == [
        {"when": "11-23 12:40:56", "exit_code": -9, "local_rank": 0, "pid": 100, "rank": 1, "attempt": 0},
        {"when": "11-23 12:41:02", "exit_code": 1, "local_rank": 0, "pid": 200, "rank": 1, "attempt": 1,
         "last_line": "RuntimeError: out of cheese"},
    ]  # fmt: skip
    assert report.worker_failures(["nothing failed"], logs) == []


def test_a_refused_op_exits_3_with_its_reason_and_the_client_raises_it(tmp_path: Path) -> None:
    """Node ops return a result or refuse; the launch host turns a refusal into an error naming the host."""
    from dslaunch.errors import NodeOpFailed
    from dslaunch.transport.base import ConnectOptions
    from dslaunch.transport.nodes import Cluster
    from dslaunch.wire.hosts import Node

    res = subprocess.run([sys.executable, "-m", "dslaunch.node.ctl", "rdzv-read"], capture_output=True, text=True,
                         input=json.dumps({"dir": str(tmp_path / "missing"), "path": "x", "token": "t"}))  # fmt: skip
    assert res.returncode == 3
    assert json.loads(res.stdout) == {"error": f"{tmp_path / 'missing'} does not exist or is not a directory"}
    with Cluster([Node("localhost", 1)], ConnectOptions(), sys.executable) as cluster:
        results = cluster.map(lambda c: c.call("rdzv-read", {"dir": str(tmp_path), "path": "/nope", "token": "t"}))
    assert isinstance(results[0].error, NodeOpFailed)
    assert results[0].error.host == "localhost" and "not the same directory" in results[0].error.reason
    with pytest.raises(Exception, match=r"check failed on 1 of 1 node\(s\):\n  localhost: .*not the same directory"):
        results.raise_failures("check")
