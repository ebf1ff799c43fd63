"""End to end through the CLI on simulated SSH nodes: up → status → logs → down → nothing left."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    PROMPTS,
    Cli,
    guard,
    job_dirs,
    job_pids,
    plain_generate,
    rank_hook,
    sim_nodes,
    ssh_job,
    status_json,
)
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


def _pids_of(command: str) -> list[tuple[int, str]]:
    """(pid, command line and environment) of each process whose command line has `command`."""
    out = subprocess.run(["ps", "axeww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines()]
    return [(int(r[0]), r[1]) for r in rows if len(r) == 2 and command in r[1] and int(r[0]) != os.getpid()]


@dataclass
class FourRanks:
    sim: SimCluster
    cli: Cli
    up: subprocess.CompletedProcess[str]
    method: str
    rdzv_dir: Path


# tcp at world 4 is test_replicas.py's job, env:// is served across nodes per replica in
# test_serve_ssh.py; here file (the rendezvous file per restart, removed by `down`), with one
# replica of every rank said explicitly (--tp 4): the same job as the default
@pytest.fixture(scope="module", params=["file"])
def four(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FourRanks]:
    """Two nodes with two slots each, per init method; the tests below take turns on the one job:
    serving first, then status, logs and `down` (which ends it)."""
    method = request.param
    rdzv = tmp_path_factory.mktemp("rdzv")
    extra = ["--rdzv-dir", str(rdzv)] if method == "file" else []
    extra += ["--tp", "4"]
    job = ssh_job(tmp_path_factory, "--init-method", method, "--timeout", "180", *extra, slots=2)
    for sim, cli, up in job:
        yield FourRanks(sim, cli, up, method, rdzv)


def test_four_ranks_generate_like_the_plain_model(four: FourRanks) -> None:
    """World size 4 (2 nodes x 2 slots) answers token for token like the plain model."""
    from dslaunch.engine.tinymodel import NAME

    cli = four.cli
    q = cli("query", *PROMPTS, "-k", "12", "--json")
    assert q.returncode == 0, q.stderr
    got = [r["text"] for r in json.loads(q.stdout)["results"]]
    assert got == plain_generate(cli.work_dir / "models" / NAME, PROMPTS, 12)
    health = json.loads(cli("query", "--health", "--deep").stdout)
    assert health["world_size"] == 4 and len(health["ranks"]) == 4
    st = json.loads(cli("status", "--json").stdout)
    assert st["front"]["ready"] and st["front"]["address"].startswith("127.0.0.1:")
    assert [(r["replica"], r["ranks"], r["hosts"]) for r in st["replicas"]] == [(0, [0, 1, 2, 3], ["node0", "node1"])]


def test_up_status_down_two_nodes(four: FourRanks) -> None:
    cli, method, tmp_path, res = four.cli, four.method, four.rdzv_dir, four.up
    assert "ready" in res.stdout

    st = status_json(cli)
    assert st["state"] == "ready", st
    assert st["world_size"] == 4 and st["init_method"] == method
    assert [r["rank"] for r in st["ranks"]] == [0, 1, 2, 3]
    assert {r["host"] for r in st["ranks"]} == {"node0", "node1"}
    assert all(r["stage"] == "ready" and r["restarts"] == 0 and r["pid"] for r in st["ranks"]), st["ranks"]
    # rank numbering follows the hostfile: ranks 0-1 on node0, 2-3 on node1
    assert [r["host"] for r in st["ranks"]] == ["node0", "node0", "node1", "node1"]
    assert all(n["agent_alive"] and n["reachable"] for n in st["nodes"])
    jid = f"DSLAUNCH_JOB_ID=default-{st['run_id']}"
    pids = job_pids(jid)
    assert {r["pid"] for r in st["ranks"]} <= set(pids)

    logs = cli("logs")
    assert logs.returncode == 0, logs.stderr
    for rank in range(4):
        assert f"[rank {rank}] group ready: rank {rank}/4, all-reduce of ranks = 6" in logs.stdout

    if method == "file":
        assert list(tmp_path.glob(f"default-{st['run_id']}-*")), "the rendezvous file should exist while up"

    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert "none left" in down.stdout
    assert job_pids(jid) == [], "down must leave no process of the job"
    assert not list(tmp_path.glob(f"default-{st['run_id']}-*")), "down removes the rendezvous file"
    assert job_dirs(cli.work_dir) == [], "down removes the job's directory on every node"

    again = cli("down")
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    gone = cli("status")
    assert gone.returncode != 0 and "no job named 'default'" in gone.stderr


@dataclass
class Shared:
    sim: SimCluster
    cli: Cli
    refused: subprocess.CompletedProcess[str]  # the first `up`, with node1's host key unknown


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One job (two nodes, one slot each) for the tests that only look at it or put back what they
    change; the last of them takes it down. It is started as a first connection to a node is:
    node1's host key unknown, `up` refused, then accepted with --accept-new-host-keys."""
    tmp = tmp_path_factory.mktemp("shared")
    with sim_nodes(tmp, 2) as sim:
        known = sim.ssh_dir / "known_hosts"
        known.write_text(known.read_text().splitlines()[0] + "\n")  # forget node1's key
        (tmp / "work").mkdir()
        cli = Cli(sim.env(), tmp / "work")
        hosts = str(sim.hostfile(slots=1))
        try:
            refused = cli.up("-H", hosts)
            ok = cli.up("-H", hosts, "--accept-new-host-keys")
            assert ok.returncode == 0, ok.stdout + ok.stderr
            yield Shared(sim, cli, refused)
        finally:
            guard(cli)


def test_unknown_host_key_refused_then_accepted(shared: Shared) -> None:
    res = shared.refused
    assert res.returncode == 1
    assert "node1: host key for [127.0.0.3]" in res.stderr and "--accept-new-host-keys" in res.stderr
    import paramiko  # the entry may be hashed (HashKnownHosts yes in /etc/ssh/ssh_config)

    known = shared.sim.ssh_dir / "known_hosts"
    assert paramiko.HostKeys(str(known)).lookup(f"[127.0.0.3]:{shared.sim.nodes[1].port}") is not None


def test_second_up_with_live_name_is_refused(shared: Shared) -> None:
    sim, cli = shared.sim, shared.cli
    hosts = sim.hostfile(slots=1)
    res = cli.up("-H", str(hosts))
    assert res.returncode == 1
    assert "a job named 'default' already exists" in res.stderr
    assert status_json(cli)["state"] == "ready", "the refused up must not disturb the running job"


def test_logs_follow_prefixes_ranks_and_stops_cleanly_on_ctrl_c(shared: Shared) -> None:
    import signal
    import time

    sim, cli = shared.sim, shared.cli
    proc = cli.popen("logs", "-f")
    seen: set[str] = set()
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            for rank in ("0", "1"):
                if line.startswith(f"[rank {rank}] group ready"):
                    seen.add(rank)
        assert seen == {"0", "1"}
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)  # seconds when idle; a CPU-starved machine has taken over 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the node-side followers: started by these nodes' sshd (SSH_CONNECTION names node and port)
    followers = [f"{n.addr} {n.port}" for n in sim.nodes]
    deadline = time.monotonic() + 15
    while (left := [p for p in _pids_of("dslaunch.node.ctl follow") if any(f in p[1] for f in followers)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert left == [], "the node-side follower ends when the client goes away"


def test_status_reports_an_unreachable_node(shared: Shared) -> None:
    """The last test of the shared job: the node comes back, and `down` ends the job."""
    sim, cli = shared.sim, shared.cli
    sim.stop_node(sim.nodes[1])
    try:
        st = status_json(cli)
        assert st["state"] == "degraded"
        assert [n["reachable"] for n in st["nodes"] if n["kind"] == "agent"] == [True, False]
        assert st["ranks"][0]["stage"] == "ready"
    finally:
        sim.start_node(sim.nodes[1])
    assert cli("down").returncode == 0


def test_unreachable_node_is_named_and_nothing_starts(sim: SimCluster, cli: Cli) -> None:
    sim.stop_node(sim.nodes[1])
    res = cli.up("-H", str(sim.hostfile(slots=1)), "--connect-timeout", "3")
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert any(line.strip().startswith("node1:") and "127.0.0.3" in line for line in err), res.stderr
    assert "Traceback" not in res.stderr
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == []
    assert cli("status").returncode != 0, "a failed up leaves no job record"


def test_silent_node_times_out_within_connect_timeout(sim: SimCluster, cli: Cli) -> None:
    """A host that accepts TCP but never speaks SSH: fail within --connect-timeout, naming it."""
    import socket
    import time

    sim.stop_node(sim.nodes[1])
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind((sim.nodes[1].addr, sim.nodes[1].port))
    silent.listen(8)
    try:
        t0 = time.monotonic()
        res = cli.up("-H", str(sim.hostfile(slots=1)), "--connect-timeout", "2")
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert res.returncode == 1
    assert "node1: no SSH answer from 127.0.0.3" in res.stderr and "--connect-timeout" in res.stderr
    assert took < 30
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == []


def test_changed_host_key_refused_even_with_accept_new(sim: SimCluster, cli: Cli) -> None:
    other = sim.root / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = (other.with_suffix(".pub")).read_text().split()
    known = sim.ssh_dir / "known_hosts"
    lines = known.read_text().splitlines()
    lines[1] = f"[127.0.0.3]:{sim.nodes[1].port} {pub[0]} {pub[1]}"
    known.write_text("\n".join(lines) + "\n")
    res = cli.up("-H", str(sim.hostfile(slots=1)), "--accept-new-host-keys")
    assert res.returncode == 1
    assert "node1: HOST KEY CHANGED" in res.stderr and "ssh-keygen -R" in res.stderr


@pytest.fixture
def sim_private(tmp_path: Path):
    """Node 1 sees its own tmpfs over the rendezvous directory: not shared with node 0."""
    rdzv = tmp_path / "rdzv"
    rdzv.mkdir()
    from tests.conftest import _sim

    gen = _sim(tmp_path, 2, private_dirs={1: [str(rdzv)]}, first_ip=6)
    cluster = next(gen)
    yield cluster, rdzv
    for _ in gen:
        pass


def test_file_method_refuses_a_directory_that_is_not_shared(sim_private, tmp_path: Path) -> None:
    cluster, rdzv = sim_private
    cli = Cli(cluster.env(), tmp_path / "work")
    cli.work_dir.mkdir()
    try:
        res = cli.up("-H", str(cluster.hostfile(slots=1)), "--init-method", "file", "--rdzv-dir", str(rdzv))
        assert res.returncode == 1
        assert "node1: --rdzv-dir" in res.stderr and "not the same directory as on node 0" in res.stderr
        assert not list(rdzv.iterdir()), "the probe file is removed"
        assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == [], "refused before anything starts"
    finally:
        guard(cli)


def test_failing_rank_makes_up_fail_and_clean_everything(sim: SimCluster, cli: Cli, tmp_path: Path) -> None:
    """A broken environment on the nodes (rank 1 cannot start): up shows why and removes all."""
    hook = rank_hook(tmp_path, "os.environ.get('LOCAL_RANK') == '1'",
                     "sys.exit('sitecustomize: rank refuses to start (simulated broken node)')")  # fmt: skip
    res = cli.up("-H", str(sim.hostfile(slots=2)), "--max-restarts", "0", *hook, "--timeout", "120")
    assert res.returncode == 1, res.stdout
    assert "the agent stopped before the job was ready" in res.stderr
    assert "everything it started was removed from every node" in res.stderr
    assert "simulated broken node" in res.stderr, "the failing rank's own words are shown"
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == []
    assert cli("status").returncode != 0


def test_localhost_without_sshd(cli: Cli) -> None:
    res = cli.up("-H", "hostfiles/localhost", "--init-method", "env", own_port=False)  # the default port
    assert res.returncode == 0, res.stderr
    st = status_json(cli)
    assert st["state"] == "ready" and st["world_size"] == 2
    assert int(st["front"]["address"].rsplit(":", 1)[1]) >= 7070, "7070 or the next free port"
    jid = f"DSLAUNCH_JOB_ID=default-{st['run_id']}"
    assert cli("down").returncode == 0
    assert job_pids(jid) == []
