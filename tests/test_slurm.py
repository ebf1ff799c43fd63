"""`--launcher slurm` against a real Slurm: munged, slurmctld and two slurmd started for this module.

Inside a real `salloc` (its own environment: SLURM_JOB_ID, SLURM_JOB_NODELIST, ...): `up` picks the
Slurm launcher by itself, every agent and the router are steps of their own that outlive `up`,
`status` names the Slurm job and its steps, `query` reaches the router through an `srun` hop, and
a killed rank restarts its gang inside the steps, `restart` starts each agent as a new step, and
`down` leaves no process and no step; the `file` and `env` init methods (with two replicas) in a
test of their own. The errors Slurm gives are one line naming the command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslaunch.errors import UserError
from dslaunch.transport.slurm import slurm as run_slurm
from dslaunch.wire.records import JobRecord, NodeRecord
from dslaunch.wire.states import JobState
from tests.conftest import Cli, guard, job_pids, status_json, wait_status
from tests.slurmsim import Allocation, SlurmSim, allocate, slurm_available

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmSim]:
    why = slurm_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    sim = SlurmSim(tmp_path_factory.mktemp("slurm"), ["sn1", "sn2"]).start()
    try:
        yield sim
    finally:
        sim.stop()


def _cli(tmp: Path, env: dict[str, str]) -> Cli:
    env = {k: v for k, v in env.items() if not k.startswith("DSLAUNCH_")}
    env.update(DSLAUNCH_HOME=str(tmp / "home"), COLUMNS="200")
    (tmp / "work").mkdir(mode=0o700, exist_ok=True)
    return Cli(env, tmp / "work")


@pytest.fixture
def alloc(slurm: SlurmSim, tmp_path: Path) -> Iterator[Allocation]:
    a = allocate(slurm, tmp_path, "-N2", "--ntasks-per-node=1")
    try:
        yield a
    finally:
        a.release()


def _our_steps(slurm: SlurmSim, job: str) -> list[str]:
    return [s for s in slurm.steps(job) if " dslaunch-" in s]


@pytest.mark.timeout(600)  # up, a gang restart, a rolling restart and down: minutes on a loaded 2-core machine
def test_up_status_query_down_inside_salloc(slurm: SlurmSim, alloc: Allocation, tmp_path: Path) -> None:
    cli = _cli(tmp_path, alloc.env)
    try:
        res = cli.up("--init-method", "tcp", "--routers", "2")
        assert res.returncode == 0, res.stdout + res.stderr
        rec = json.loads((tmp_path / "home" / "jobs" / "default.json").read_text())
        assert rec["launcher"] == "slurm" and rec["launcher_meta"] == {"job": alloc.job}
        assert [n["host"] for n in rec["nodes"]] == ["sn1", "sn2", "sn1", "sn2"]  # agents, then routers
        jid = rec["job_id"]
        # `up` has exited: every agent and both routers run on as steps of their own
        steps = _our_steps(slurm, alloc.job)
        assert sorted(s.split()[1] for s in steps) == [f"dslaunch-{jid}-{i}" for i in range(4)], steps
        st = status_json(cli)
        assert st["state"] == "ready", st["reason"]
        labels = dict(map(tuple, st["launcher"]))
        assert labels["launcher"] == "slurm" and labels["slurm job"] == f"{alloc.job} RUNNING"
        assert f"dslaunch-{jid}-0" in labels["slurm steps"]
        shown = cli("status")
        assert "launcher slurm" in shown.stdout and f"slurm job {alloc.job} RUNNING" in shown.stdout
        q = cli("query", "Hello world", "-k", "4", "--json")
        assert q.returncode == 0, q.stderr
        assert json.loads(q.stdout)["text"]
        # Slurm drains a node mid-job: its steps run on, and status says so in one line
        slurm.run("scontrol", "update", "nodename=sn2", "state=drain", "reason=disk check")
        try:
            labels = dict(map(tuple, status_json(cli)["launcher"]))
            assert labels["slurm node sn2"] == "draining (sinfo: disk check): Slurm starts no new job there", labels
            assert "slurm node sn1" not in labels
        finally:
            slurm.run("scontrol", "update", "nodename=sn2", "state=resume")
        # a rank killed: torchrun restarts the gang inside the steps, rank 0 stays on the first node
        victim = st["ranks"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        st = wait_status(cli, lambda s: s["state"] == "ready" and all(r["restarts"] == 1 for r in s["ranks"]))
        assert [(r["rank"], r["host"], r["restarts"]) for r in st["ranks"]] == [(0, "sn1", 1), (1, "sn2", 1)]
        assert victim not in {r["pid"] for r in st["ranks"]}
        assert len(_our_steps(slurm, alloc.job)) == 4  # the same steps: the agents never left
        # a rolling restart starts each agent again as a new step of its own
        before = set(_our_steps(slurm, alloc.job))
        again = cli("restart", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        after = _our_steps(slurm, alloc.job)
        assert len(after) == 4 and len(set(after) - before) == 2, (before, after)  # both routers kept their steps
        assert status_json(cli)["state"] == "ready"
        logs = cli("logs", "--lines", "200")
        assert logs.returncode == 0 and "[rank 1]" in logs.stdout, logs.stderr
        down = cli("down")
        assert down.returncode == 0 and "verified: none left" in down.stdout, down.stdout + down.stderr
        assert _our_steps(slurm, alloc.job) == []
        assert job_pids(f"DSLAUNCH_JOB_ID={jid}") == []
        assert not (tmp_path / "home" / "jobs" / "default.json").exists()
    finally:
        guard(cli)


@pytest.mark.parametrize(("method", "tp"), [("file", None), ("env", 1)])
def test_the_other_init_methods_and_replicas_inside_salloc(
    slurm: SlurmSim, alloc: Allocation, tmp_path: Path, method: str, tp: int | None
) -> None:
    """`file` (a rendezvous directory both nodes see) and `env` (with two one-rank replicas, each
    its own steps): up, status, query and down, with no process and no step left."""
    cli = _cli(tmp_path, alloc.env)
    extra = ["--rdzv-dir", str(tmp_path / "rdzv")] if method == "file" else []
    (tmp_path / "rdzv").mkdir()
    try:
        res = cli.up("--init-method", method, *extra, *(["--tp", str(tp)] if tp else []))
        assert res.returncode == 0, res.stdout + res.stderr
        st = status_json(cli)
        assert st["state"] == "ready" and st["init_method"] == method, st["reason"]
        assert len(st["replicas"]) == (2 if tp else 1), st["replicas"]
        assert dict(map(tuple, st["launcher"]))["launcher"] == "slurm"
        for prompt in ("Hello world", "The quick brown fox"):  # with two replicas, both get one
            q = cli("query", prompt, "-k", "4", "--json")
            assert q.returncode == 0 and json.loads(q.stdout)["text"], q.stderr
        jid = json.loads((tmp_path / "home" / "jobs" / "default.json").read_text())["job_id"]
        down = cli("down")
        assert down.returncode == 0 and "verified: none left" in down.stdout, down.stdout + down.stderr
        assert _our_steps(slurm, alloc.job) == [] and job_pids(f"DSLAUNCH_JOB_ID={jid}") == []
    finally:
        guard(cli)


def test_slurm_errors_are_one_line_naming_the_command(slurm: SlurmSim, tmp_path: Path) -> None:
    a = allocate(slurm, tmp_path, "-N1")
    cli = _cli(tmp_path, a.env)
    try:
        # no Slurm commands on PATH: which one is missing, said once
        no_srun = _cli(tmp_path, {**a.env, "PATH": str(Path(os.sys.executable).parent)})
        _one_line(no_srun.up(), "scontrol: not found")
        # the dry run names the launcher, the allocation and the selection in srun's terms
        dry = cli.up("--dry-run")
        assert dry.returncode == 0, dry.stderr
        out = " ".join(dry.stdout.split())
        assert "launcher slurm" in out and f"slurm job {a.job} RUNNING" in out and "srun selection -n 1" in out
        assert "sn1" in out
        # a partition Slurm refuses: one line, the command and Slurm's own message
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(slurm.conf))
            refused = r"^sbatch: Batch job submission failed: Invalid partition name specified$"
            with pytest.raises(UserError, match=refused):
                run_slurm(["sbatch", "-p", "nosuch", "-N1", "--wrap", "true"])
        # an allocation that has ended: up says which command failed and why
        a.release()
        _one_line(cli.up(), f"squeue: Slurm job {a.job} no longer exists (the allocation ended or expired")
    finally:
        a.release()
        guard(cli)


def test_down_after_the_allocation_ended_removes_the_record(slurm: SlurmSim, tmp_path: Path) -> None:
    """Slurm ended the allocation (time limit, scancel) and every step with it: `down` says so."""
    a = allocate(slurm, tmp_path, "-N1")
    a.release()
    cli = _cli(tmp_path, a.env)
    jobs = tmp_path / "home" / "jobs"
    jobs.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "home", 0o700)
    rec = JobRecord(name="default", run_id="r1", job_id="default-r1", state=JobState.READY, world_size=1,
                    init_method="tcp", backend="gloo", python=os.sys.executable, master_addr="127.0.0.1",
                    master_port=1, rdzv_port=2, launcher="slurm", launcher_meta={"job": a.job},
                    nodes=[NodeRecord(0, "sn1", "sn1", 1, 0, str(tmp_path / "work" / "n0"))])  # fmt: skip
    (jobs / "default.json").write_text(json.dumps(rec.to_dict()))
    (jobs / "default.json").chmod(0o600)
    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert f"the Slurm job {a.job} had ended already" in down.stdout
    assert not (jobs / "default.json").exists()


def _one_line(res: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert fragment in lines[0], res.stderr


def _submitted(slurm: SlurmSim, name: str = "default") -> list[tuple[str, str, str]]:
    out = slurm.run("squeue", "-h", "-n", f"dslaunch-{name}", "-o", "%i|%T|%r", check=False).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def _read_until(p: subprocess.Popen[str], fragment: str, timeout: float = 60) -> str:
    """The process's stderr up to and including the first line holding `fragment`: a signal sent
    after this reaches a process that has printed that line (not one still starting)."""
    import threading

    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert p.stderr is not None
        for line in iter(p.stderr.readline, ""):
            lines.append(line)
            if fragment in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert found.wait(timeout), f"no {fragment!r} in {''.join(lines)!r}"
    reader.join()
    return "".join(lines)


def _wait_for(cond: object, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.timeout(600)  # three ups that pend, each ended in its own way: minutes on a loaded machine
def test_from_a_login_node_up_submits_shows_pending_and_down_cancels(slurm: SlurmSim, tmp_path: Path) -> None:
    """No allocation: `up` submits one, says why it pends (the partition is held down), runs
    once Slurm runs it, and `down` cancels it; Ctrl-C while it pends cancels it too."""
    cli = _cli(tmp_path, slurm.env())
    slurm.run("scontrol", "update", f"PartitionName={slurm.partition}", "State=DOWN")
    try:
        # Ctrl-C while pending: the submitted job is cancelled
        p = cli.popen("up", "--launcher", "slurm", "--num-nodes", "1", "--work-dir", str(cli.work_dir))
        seen = _read_until(p, "PENDING: PartitionDown (Ctrl-C cancels it)")
        os.kill(p.pid, signal.SIGINT)
        _out, err = p.communicate(timeout=180)  # scancel, then squeue until it is gone: slow when CPU-starved
        err = seen + err
        assert p.returncode == 130, err
        assert "PENDING: PartitionDown (Ctrl-C cancels it)" in err and "cancelled Slurm job" in err, err
        _wait_for(lambda: not _submitted(slurm))
        # `down` while it pends cancels it, and the waiting `up` ends, saying so
        p = cli.popen("up", "--launcher", "slurm", "--num-nodes", "1", "--work-dir", str(cli.work_dir))
        seen = _read_until(p, "PENDING: PartitionDown")
        down = cli("down")
        assert down.returncode == 0 and "cancelled Slurm job" in down.stdout, down.stdout + down.stderr
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 1 and "ended before it ran" in err, seen + err
        assert _submitted(slurm) == [] and cli("status").returncode == 1, "nothing left to show"
        # pending, then running once the partition is up again, then ready; down cancels it
        p = cli.popen("up", "--launcher", "slurm", "--num-nodes", "1", "--work-dir", str(cli.work_dir),
                      "--time", "30")  # fmt: skip
        _wait_for(lambda: [s[1:] for s in _submitted(slurm)] == [("PENDING", "PartitionDown")])
        job = _submitted(slurm)[0][0]
        st = cli("status")  # before any record exists: what Slurm says, and who waits
        assert st.returncode == 0 and f"submitted, Slurm job {job} PENDING: PartitionDown" in st.stdout, st.stdout
        held = status_json(cli)
        assert (held["state"], held["slurm_job"], held["up_alive"]) == ("submitted", job, True), held
        again = cli("up", "--launcher", "slurm", "--num-nodes", "1", "--work-dir", str(cli.work_dir))
        assert again.returncode == 1 and f"already waiting for Slurm job {job}" in again.stderr, again.stderr
        assert len(_submitted(slurm)) == 1, "the second up submitted nothing"
        slurm.run("scontrol", "update", f"PartitionName={slurm.partition}", "State=UP")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        assert f"Slurm job {job} PENDING: PartitionDown" in err
        labels = dict(map(tuple, status_json(cli)["launcher"]))
        assert labels["slurm job"] == f"{job} RUNNING" and "dslaunch-default-" in labels["slurm steps"]
        down = cli("down")
        assert down.returncode == 0 and "verified: none left" in down.stdout, down.stdout + down.stderr
        assert _submitted(slurm) == [] and slurm.steps(job) == []
    finally:
        slurm.run("scontrol", "update", f"PartitionName={slurm.partition}", "State=UP")
        for job, _state, _reason in _submitted(slurm):
            slurm.run("scancel", job, check=False)
        guard(cli)
