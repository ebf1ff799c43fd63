"""Hardening of the lifecycle against other local users and against text from the job.

Every test runs real processes: `python -m dslaunch.node.ctl` and the `dslaunch` CLI against
stale job records, unrelated processes that must survive, and a fake front on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.wire.records import FrontRecord, JobRecord, NodeRecord
from dslaunch.wire.states import JobState
from tests.conftest import Cli, job_pids

ROOT = os.geteuid() == 0
OTHER_UID = 65534  # nobody
# Job ids here are unique to this run: `down` ends whatever carries a job id, on a shared machine too.
RUN = uuid.uuid4().hex[:8]
# The CLI as its console script runs it: the script's directory, not the working directory, on sys.path.
CLI_ENTRY = "import sys; sys.path.pop(0); from dslaunch.cli import main; main(prog_name='dslaunch')"


def _record(node_dir: Path, name: str = "default", python: str = sys.executable, port: int = 1) -> JobRecord:
    nodes = [NodeRecord(0, "localhost", "localhost", 1, 0, str(node_dir), "127.0.0.1")]
    front = FrontRecord("127.0.0.1", port, True, "generate", "m")
    return JobRecord(name, RUN, f"{name}-{RUN}", JobState.READY, 1, "tcp", "gloo", python, "127.0.0.1", 2, 3, nodes,
                     command_timeout=30, front=front)  # fmt: skip


def _save(cli: Cli, rec: JobRecord, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save a record where the CLI finds it, through the store (private directories)."""
    from dslaunch.launch import store

    monkeypatch.setenv("DSLAUNCH_HOME", cli.env["DSLAUNCH_HOME"])
    store.save(rec)


def _evil_python(tmp_path: Path) -> tuple[str, Path]:
    """An 'interpreter' that leaves a mark when run: a planted record must never get it run."""
    marker = tmp_path / "ran"
    script = tmp_path / "evil-python"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    script.chmod(0o755)
    return str(script), marker


def _one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _nodectl(
    op: str, args: dict[str, Any], env: dict[str, str] | None = None, umask: int = -1
) -> tuple[int, dict[str, Any]]:
    """Run one real node op, as the launch host does, and decode its answer."""
    res = subprocess.run([sys.executable, "-m", "dslaunch.node.ctl", op], input=json.dumps(args) + "\n",
                         capture_output=True, text=True, timeout=60, env=env, umask=umask)  # fmt: skip
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


# -- secrets of the caller's environment never reach the job ---------------------------------------


def test_nodectl_start_keeps_dslaunch_variables_of_its_caller_out_of_the_agent(tmp_path: Path) -> None:
    """Over SSH nodectl's own environment is passed on: DSLAUNCH_TOKEN there must not be."""
    jid = f"envtest-{time.monotonic_ns()}"
    node_dir = tmp_path / "work" / jid / "node0"
    env = dict(os.environ, DSLAUNCH_TOKEN="s3cret-token-value-123456", DSLAUNCH_HOME=str(tmp_path / "h"))
    args = {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir),
            "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
            "env": {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "0", "KEEP": "me"}}  # fmt: skip
    try:
        code, out = _nodectl("start", args, env)
        assert code == 0, out
        pids = job_pids(f"DSLAUNCH_JOB_ID={jid}")
        assert len(pids) >= 2, "the shell wrapper and the agent"
        for pid in pids:
            environ = _environ(pid)
            assert b"s3cret-token-value" not in environ and b"DSLAUNCH_HOME=" not in environ
            assert b"KEEP=me" in environ, "the plan's variables do reach the job"
    finally:
        _nodectl("stop", {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir), "grace": 1})
    assert job_pids(f"DSLAUNCH_JOB_ID={jid}") == []


def test_the_local_transport_passes_no_token_or_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    from dslaunch.transport.base import ConnectOptions
    from dslaunch.transport.local import LocalTransport
    from dslaunch.wire.hosts import Node

    monkeypatch.setenv("DSLAUNCH_TOKEN", "tok-tok-tok-tok-tok-tok")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "gh-secret")
    monkeypatch.setenv("MY_SETTING", "kept")
    res = LocalTransport(Node("localhost", 1), ConnectOptions()).run(
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    )
    seen = json.loads(res.stdout)
    assert not {"DSLAUNCH_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"} & set(seen)
    assert seen["MY_SETTING"] == "kept" and "PATH" in seen


# -- `down` signals only processes that carry the job's marker -------------------------------------


@pytest.fixture
def unrelated_session_leader() -> Iterator[subprocess.Popen[bytes]]:
    """`setsid sleep 60`: a process group leader that has nothing to do with any job."""
    p = subprocess.Popen(["setsid", "sleep", "60"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/comm") as f:
            if f.read().strip() == "sleep" and os.getsid(p.pid) == p.pid:
                break
        time.sleep(0.02)
    assert os.getpgid(p.pid) == p.pid
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_down_spares_a_stale_agent_pid_reused_by_an_unrelated_process(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unrelated_session_leader: subprocess.Popen[bytes]
) -> None:
    """A stale record (as after a reboot) whose agent.pid now names someone else's session leader."""
    job_dir = cli.work_dir / f"default-{RUN}"
    job_dir.mkdir(mode=0o700)
    node_dir = job_dir / "node0"
    node_dir.mkdir(mode=0o700)
    (node_dir / "agent.pid").write_text(str(unrelated_session_leader.pid))
    _save(cli, _record(node_dir), monkeypatch)
    st = json.loads(cli("status", "--json").stdout)
    assert st["state"] == "gone" and not st["nodes"][0]["agent_alive"], st
    res = cli("down", "--grace", "2")
    assert res.returncode == 0 and "none left" in res.stdout, res.stdout + res.stderr
    time.sleep(0.2)
    assert unrelated_session_leader.poll() is None, "down signalled a process that is not the job's"
    assert not node_dir.exists()


def test_nodectl_stop_spares_it_too(tmp_path: Path, unrelated_session_leader: subprocess.Popen[bytes]) -> None:
    node_dir = tmp_path / "node0"
    node_dir.mkdir(mode=0o700)
    (node_dir / "agent.pid").write_text(str(unrelated_session_leader.pid))
    code, out = _nodectl("stop", {"job_id": f"stale-{RUN}", "node_rank": 0, "node_dir": str(node_dir), "grace": 1})
    assert code == 0 and out["found"] == 0 and out["survivors"] == [], out
    time.sleep(0.2)
    assert unrelated_session_leader.poll() is None


# -- job names never leave the jobs directory --------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--name", "../../x"],
        ["logs", "--name", "../../x"],
        ["query", "--name", "../../x", "Hello"],
        ["down", "--name", "../../x"],
        ["down", "--name", "../x"],
        ["status", "--name", "x\n"],
    ],
)
def test_a_name_that_leaves_the_jobs_directory_is_one_line_error(cli: Cli, tmp_path: Path, argv: list[str]) -> None:
    python, marker = _evil_python(tmp_path)
    home = Path(cli.env["DSLAUNCH_HOME"])
    (home / "jobs").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    for planted in (tmp_path / "x.json", home / "x.json"):  # jobs/../../x.json, jobs/../x.json
        planted.write_text(json.dumps(_record(tmp_path / "n", python=python).to_dict()))
    _one_line_error(cli(*argv), "--name", "use letters, digits")
    assert not marker.exists(), "a record outside the jobs directory was used"


# -- state and work directories are the user's alone -------------------------------------------------


def _plant_default(jobs: Path, tmp_path: Path) -> Path:
    python, marker = _evil_python(tmp_path)
    (jobs / "default.json").write_text(json.dumps(_record(tmp_path / "n", python=python).to_dict()))
    return marker


CASES = ["jobs-symlink", "jobs-world-writable", "home-group-writable", "home-symlink", "jobs-not-yours"]


@pytest.mark.parametrize("case", CASES)
def test_job_records_are_read_only_from_private_directories(cli: Cli, tmp_path: Path, case: str) -> None:
    if case == "jobs-not-yours" and not ROOT:
        pytest.skip("needs root to give a directory to another user")
    home = Path(cli.env["DSLAUNCH_HOME"])
    env = dict(cli.env)
    if case == "home-symlink":
        real = tmp_path / "real-home"
        (real / "jobs").mkdir(parents=True, mode=0o700)
        real.chmod(0o700)
        home.symlink_to(real)
        marker, why = _plant_default(real / "jobs", tmp_path), "is a symbolic link"
    else:
        home.mkdir(mode=0o700)
        jobs = home / "jobs"
        if case == "jobs-symlink":
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir(mode=0o700)
            jobs.symlink_to(elsewhere)
            why = "is a symbolic link"
        else:
            jobs.mkdir(mode=0o700)
        marker = _plant_default(jobs, tmp_path)
        if case == "jobs-world-writable":
            jobs.chmod(0o777)
            why = "is writable by other users"
        elif case == "home-group-writable":
            home.chmod(0o770)
            why = "is writable by other users"
        elif case == "jobs-not-yours":
            os.chown(jobs, OTHER_UID, OTHER_UID)
            why = f"is owned by uid {OTHER_UID}"
    for argv in (["status"], ["down"]):
        res = subprocess.run([sys.executable, "-m", "dslaunch", *argv], env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        _one_line_error(res, why, str(home))
    assert not marker.exists(), "a planted record was used"


def test_start_creates_the_job_directories_private(tmp_path: Path) -> None:
    jid = f"mode-{time.monotonic_ns()}"
    node_dir = tmp_path / "work" / jid / "node0"
    args = {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir),
            "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
            "env": {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "0"}}  # fmt: skip
    try:
        code, out = _nodectl("start", args, umask=0o002)  # a lax umask (user-private groups) changes nothing
        assert code == 0, out
        for d in (tmp_path / "work", node_dir.parent, node_dir, node_dir / "logs", node_dir / "ranks"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        _nodectl("stop", {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir), "grace": 1})
    assert job_pids(f"DSLAUNCH_JOB_ID={jid}") == []


@pytest.mark.parametrize("case", ["world-writable", "job-dir-world-writable", "symlink", "not-yours"])
def test_start_refuses_a_job_directory_others_could_change(tmp_path: Path, case: str) -> None:
    if case == "not-yours" and not ROOT:
        pytest.skip("needs root to give a directory to another user")
    jid = f"dirs-{time.monotonic_ns()}"
    job_dir = tmp_path / "work" / jid
    job_dir.mkdir(parents=True, mode=0o700)
    node_dir = job_dir / "node0"
    if case == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        node_dir.symlink_to(tmp_path / "elsewhere")
    else:
        node_dir.mkdir(mode=0o700)
    if case == "world-writable":
        node_dir.chmod(0o777)
    elif case == "job-dir-world-writable":
        job_dir.chmod(0o777)
    elif case == "not-yours":
        os.chown(node_dir, OTHER_UID, OTHER_UID)
    args = {"job_id": jid, "node_rank": 0, "node_dir": str(node_dir),
            "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
            "env": {"DSLAUNCH_JOB_ID": jid, "DSLAUNCH_NODE_RANK": "0"}}  # fmt: skip
    code, out = _nodectl("start", args)
    assert code == 3 and "refusing to run a job in it" in out["error"], out
    assert job_pids(f"DSLAUNCH_JOB_ID={jid}") == [], "nothing was started"


@pytest.mark.parametrize("case", ["node-dir", "job-dir"])
def test_stop_does_not_remove_a_directory_others_could_change(tmp_path: Path, case: str) -> None:
    job_dir = tmp_path / "work" / f"j-{RUN}"
    job_dir.mkdir(parents=True, mode=0o700)
    node_dir = job_dir / "node0"
    node_dir.mkdir(mode=0o700)
    (node_dir / "precious").write_text("x")
    (node_dir if case == "node-dir" else job_dir).chmod(0o777)
    code, out = _nodectl("stop", {"job_id": f"j-{RUN}", "node_rank": 0, "node_dir": str(node_dir), "grace": 1})
    assert code == 3 and "processes are stopped" in out["error"] and "writable by other users" in out["error"], out
    assert (node_dir / "precious").exists()


@pytest.mark.parametrize("argv", [["status"], ["down"], ["up", "--model", "/nonexistent/model"]])
def test_a_json_py_in_the_working_directory_is_never_imported(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """nodectl runs as `python -m`, which would put the caller's directory first on sys.path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "imported"
    (cwd / "json.py").write_text(f"open({str(marker)!r}, 'a').write('imported\\n')\nfrom_cwd = True\n")
    if argv[0] != "up":
        node_dir = cli.work_dir / f"default-{RUN}" / "node0"
        _save(cli, _record(node_dir), monkeypatch)
    else:
        argv = [*argv, "--work-dir", str(cli.work_dir)]
    res = subprocess.run([sys.executable, "-c", CLI_ENTRY, *argv], env=cli.env, cwd=cwd, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    if argv[0] == "up":
        assert res.returncode == 1 and "no such model directory" in res.stderr, res.stderr
    else:
        assert res.returncode == 0, res.stdout + res.stderr
    assert not marker.exists(), "nodectl imported json.py from the caller's working directory"


# -- terminal escapes: text from the job is printed, never acted on ----------------------------------

NASTY = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m text\x9b1m and\x07 more\x1b[8m"


def _assert_inert(out: str) -> None:
    for c in ("\x1b", "\x9b", "\x07", "\r"):
        assert c not in out, repr(out)


def test_logs_print_escape_sequences_as_inert_text(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node_dir = tmp_path / "n0"
    (node_dir / "logs").mkdir(parents=True)
    (node_dir / "logs" / "rank0.log").write_text(f"hello\n{NASTY}\nprogress 10%\rprogress 100%\nbye\n")
    _save(cli, _record(node_dir), monkeypatch)
    res = cli("logs")
    assert res.returncode == 0, res.stderr
    _assert_inert(res.stdout)
    assert "red text and more" in res.stdout and "[rank 0] hello" in res.stdout and "progress 100%" in res.stdout


class _FakeFront:
    """A front on loopback that answers every request with text full of escape sequences."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    req = json.loads(line)
                    answers: list[dict[str, Any]] = []
                    if req.get("stream"):  # cut inside escape sequences too: each chunk is printed alone
                        cuts = [NASTY[:3], NASTY[3:25], NASTY[25:]]
                        answers += [{"id": req["id"], "ok": True, "index": 0, "chunk": c} for c in cuts]
                    answers.append({"id": req["id"], "ok": True, "text": NASTY, "tokens": 3, "done": True})
                    for a in answers:
                        f.write(json.dumps(a).encode() + b"\n")
                    f.flush()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


def test_query_prints_model_output_as_inert_text_but_json_keeps_it(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    front = _FakeFront()
    try:
        _save(cli, _record(tmp_path / "n0", port=front.port), monkeypatch)
        res = cli("query", "Hello")
        assert res.returncode == 0, res.stderr
        _assert_inert(res.stdout)
        assert res.stdout.strip() == "red text and more"
        res = cli("query", "Hello", "--stream")
        assert res.returncode == 0, res.stderr
        _assert_inert(res.stdout)
        assert res.stdout.rstrip().endswith("text and more")
        res = cli("query", "Hello", "--json")
        assert json.loads(res.stdout)["text"] == NASTY, "--json output is the answer as it is"
    finally:
        front.close()


def test_status_shows_errors_from_the_nodes_as_inert_text() -> None:
    from rich.console import Console

    from dslaunch.cli import render
    from dslaunch.launch.status import JobStatus, NodeStatus, RankStatus

    st = JobStatus(
        name="j", state=JobState.FAILED, world_size=1, init_method="tcp", backend="gloo", run_id="r",
        master="127.0.0.1:1", created=0.0, reason="every agent has ended",
        nodes=[NodeStatus(0, "node0", True, error=NASTY, log_tail=[NASTY])],
        ranks=[RankStatus(0, "node0", 0, 0, stage="failed", error=NASTY, device=NASTY)],
        last_failure={"rank": 0, "host": "node0", "cause": "exit 1", "when": "now", "last_line": NASTY},
        front={"address": "127.0.0.1:7070", "ready": False, "task": "generate", "model": NASTY},
    )  # fmt: skip
    console = Console(width=400, record=True, force_terminal=False)
    console.print(render.status_view(st))
    _assert_inert(console.export_text())
