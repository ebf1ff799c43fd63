"""Gang restart and interruption on simulated SSH nodes: rank 0 stays on node 0; Ctrl-C cleans up."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import Cli, front_port, job_dirs, job_pids, rank_hook, status_json, wait_status
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


# tcp (the default) restarts are exercised under load by test_rank_dies_in_flight and test_replicas
@pytest.mark.parametrize("method", ["file"])
def test_killed_rank_restarts_the_gang_and_rank0_stays_on_node0(
    sim: SimCluster, cli: Cli, tmp_path, method: str
) -> None:
    extra = ["--rdzv-dir", str(tmp_path)] if method == "file" else []
    # node1 listed first in the hostfile sorts after node0 by address: the agent's own order differs
    hosts = sim.hostfile(slots=1, nodes=[sim.nodes[1], sim.nodes[0]])
    assert cli.up("-H", str(hosts), "--init-method", method, "--port", front_port(), *extra).returncode == 0
    st = status_json(cli)
    assert [r["host"] for r in st["ranks"]] == ["node1", "node0"]
    victim = st["ranks"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    st = wait_status(cli, lambda s: s["state"] == "ready" and all(r["restarts"] == 1 for r in s["ranks"]))
    assert st["state"] == "ready", st
    assert [(r["rank"], r["host"], r["restarts"]) for r in st["ranks"]] == [(0, "node1", 1), (1, "node0", 1)]
    assert victim not in {r["pid"] for r in st["ranks"]}
    # ready again, and status still says why it restarted
    last = st["last_failure"]
    assert (last["rank"], last["host"], last["pid"], last["exit_code"]) == (1, "node0", victim, -9), last
    logs = cli("logs", "--rank", "0").stdout
    assert "attempt 1" in logs and "all-reduce of ranks = 1" in logs
    # the front came back on the first hostfile node and serves again
    health = cli("query", "--health", "--deep")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["restarts"] == 1 and len(json.loads(health.stdout)["ranks"]) == 2
    assert cli("query", "Hello", "-k", "3").returncode == 0
    if method == "file":
        assert len(list(tmp_path.glob(f"default-{st['run_id']}-*"))) >= 1
    assert cli("down").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID=default-{st['run_id']}") == []
    assert not list(tmp_path.glob(f"default-{st['run_id']}-*"))


def test_ctrl_c_during_up_removes_everything(sim: SimCluster, cli: Cli, tmp_path) -> None:
    # ranks that never get ready: node1's worker sleeps before starting, so up is still waiting
    hook = rank_hook(tmp_path, "'LOCAL_RANK' in os.environ", "time.sleep(120)")
    proc = cli.popen("up", "--work-dir", str(cli.work_dir), "-H", str(sim.hostfile(slots=1)), *hook)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}")) < 4:
            time.sleep(0.2)
        assert len(job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}")) >= 4, "agents and ranks should be running"
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=180)  # the teardown of both nodes: minutes when CPU-starved
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: everything 'up' had started was removed from every node" in err
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == []
    assert cli("status").returncode != 0, "no half-written job record is left"
    assert job_dirs(cli.work_dir) == [], "the nodes' job directories are removed"
