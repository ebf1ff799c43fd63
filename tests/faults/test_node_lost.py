"""A node drops off the network while `up` waits for the ranks: `up` fails naming it, node 0 is
cleaned at once, the lost node's processes end on their own, and `down` clears the record."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, job_pids, rank_hook
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


def _wait_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := job_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_a_node_lost_during_up_is_named_and_nothing_is_left(sim: SimCluster, cli: Cli, tmp_path: Path) -> None:
    # node 1's ranks take long to load, so `up` is still waiting when the node goes away
    hook = rank_hook(tmp_path, "'LOCAL_RANK' in os.environ and os.environ.get('DSLAUNCH_NODE_RANK') == '1'",
                     "time.sleep(300)")  # fmt: skip
    proc = cli.popen("up", "--work-dir", str(cli.work_dir), "-H", str(sim.hostfile(slots=1)),
                     *hook, "--timeout", "200")  # fmt: skip
    everywhere = f"DSLAUNCH_NODE_DIR={cli.work_dir}"
    try:
        deadline = time.monotonic() + 60

        def on_both_nodes() -> bool:  # per node: the agent's shell, the agent and the rank
            jobs = [p.name for p in cli.work_dir.iterdir() if p.name != "models"]
            return bool(jobs) and all(
                len(job_pids(f"{everywhere}/{jobs[0]}/node{i}")) >= 3 for i in (0, 1)
            )  # not the router's processes: they are on node 0 from the start

        while time.monotonic() < deadline and not on_both_nodes():
            time.sleep(0.2)
        assert on_both_nodes(), "agents and ranks should be running on both nodes"
        time.sleep(1)
        t0 = time.monotonic()
        sim.cut_node(sim.nodes[1])
        _out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "node1" in err and "lost contact" in err and "was lost" in err, err
    assert "could not clean node1" in err and "dslaunch down" in err, err
    assert took < 60, f"up took {took:.0f}s to notice"
    jid = next(p.name for p in cli.work_dir.iterdir() if p.name != "models")
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}/{jid}/node0") == [], "node 0 is cleaned at once"
    # the lost node's agent loses its rendezvous host (node 0) and ends, taking its ranks with it
    left = _wait_gone(f"DSLAUNCH_NODE_DIR={cli.work_dir}/{jid}/node1", 120)
    assert left == [], "the partitioned node's processes did not end on their own"
    st = cli("status")
    assert st.returncode == 0 and "node1" in st.stdout and "unreachable" in st.stdout, st.stdout + st.stderr
    sim.start_node(sim.nodes[1])
    down = cli("down", "--grace", "3")
    assert down.returncode == 0, down.stdout + down.stderr
    assert cli("status").returncode != 0, "the record is gone"
