"""A node's agent dies, restarts run out, a record goes stale: status names it, down cleans it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import Cli, job_pids, kill_marked, status_json, wait_status
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


def _agent_pid(run_id: str, node_rank: int) -> int:
    """This job's torchrun agent itself (the recorded pid is the shell that waits for it); only
    this job's: other jobs on the machine (another test run) have agents too."""
    out = subprocess.run(["ps", "axeww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        is_agent = "-m dslaunch.rank.torchrun" in args and not args.startswith("/bin/sh")
        words = set(args.split())
        ours = {f"DSLAUNCH_JOB_ID=default-{run_id}", f"DSLAUNCH_NODE_RANK={node_rank}"} <= words
        if is_agent and ours:
            return int(pid)
    raise AssertionError(f"no agent for node {node_rank}")


def test_a_dead_agent_is_named_in_status_and_down_still_cleans_every_node(sim: SimCluster, cli: Cli) -> None:
    up = cli.up("-H", str(sim.hostfile(slots=1)))
    assert up.returncode == 0, up.stdout + up.stderr
    run_id = status_json(cli)["run_id"]
    os.kill(_agent_pid(run_id, 1), signal.SIGKILL)
    st = wait_status(cli, lambda s: s["state"] != "ready")
    assert st["state"] == "degraded" and "node1" in st["reason"], st
    assert not st["nodes"][1]["agent_alive"] and st["nodes"][0]["agent_alive"]
    assert "node1" in cli("status").stdout
    down = cli("down", "--grace", "5")
    assert down.returncode == 0 and "none left" in down.stdout, down.stdout + down.stderr
    assert job_pids(f"DSLAUNCH_JOB_ID=default-{run_id}") == []


def test_exhausted_restarts_end_in_failed_with_the_reason(sim: SimCluster, cli: Cli) -> None:
    up = cli.up("-H", str(sim.hostfile(slots=1)), "--max-restarts", "0")
    assert up.returncode == 0, up.stdout + up.stderr
    st = status_json(cli)
    os.kill(st["ranks"][1]["pid"], signal.SIGKILL)
    st = wait_status(cli, lambda s: s["state"] == "failed", timeout=90)
    assert st["state"] == "failed", st
    assert "every agent has ended" in st["reason"]
    shown = cli("status")
    text = shown.stdout
    assert "exited 1" in text and "last lines of the agent log" in text, text + shown.stderr
    assert "exitcode" in text and "-9" in text, "the killed rank's signal is shown"
    assert st["last_failure"]["rank"] == 1 and st["last_failure"]["cause"] == "killed by SIGKILL", st
    assert "last failure rank 1 on node1" in text and "killed by SIGKILL" in text
    assert cli("down").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID=default-{st['run_id']}") == []


def test_a_stale_record_is_reported_and_the_name_can_be_reused(cli: Cli) -> None:
    assert cli.up().returncode == 0
    run_id = status_json(cli)["run_id"]
    kill_marked(f"DSLAUNCH_JOB_ID=default-{run_id}")  # as after a reboot: every process gone
    st = wait_status(cli, lambda s: s["state"] == "gone", timeout=30)
    assert st["state"] == "gone" and "stale record" in st["reason"]
    again = cli.up()
    assert again.returncode == 1 and "already exists (state" in again.stderr and "dslaunch down" in again.stderr
    assert cli("down").returncode == 0
    assert cli.up().returncode == 0, "the name is free again after down"
    assert cli("query", "Hello", "-k", "2").returncode == 0
