"""The front's token is required off loopback and never reaches the environment of a job's
processes on localhost, its command lines or its logs.

The local transport runs nodectl as a child of the CLI, and nodectl passes its environment on to
the agent: whatever the CLI's environment held would sit in `/proc/<pid>/environ` of every job
process. Checked with the token from DSLAUNCH_TOKEN and with a generated one (`--bind 0.0.0.0`).
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError
from tests.conftest import Cli, job_pids, local_job

CREDENTIAL = "ghp_" + "x" * 30  # another secret of the caller's shell


@pytest.fixture(scope="module", params=["DSLAUNCH_TOKEN", "generated"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {"GITHUB_TOKEN": CREDENTIAL, "MY_SETTING": "reaches-the-job"}
    args: list[str] = []
    if request.param == "DSLAUNCH_TOKEN":
        env["DSLAUNCH_TOKEN"] = secrets.token_urlsafe(32)
        args = ["--rank-start", "exec"]  # ranks as plain torchrun starts them: interpreters of their own
    else:
        args = ["--bind", "0.0.0.0"]  # ranks forked from the agent
    for cli, rec in local_job(tmp_path_factory, *args, env=env):
        yield {"cli": cli, "rec": rec, "env_token": env.get("DSLAUNCH_TOKEN")}


def test_no_job_process_has_the_token_in_its_environment(job: dict[str, Any]) -> None:
    cli: Cli = job["cli"]
    token = job["rec"]["front"]["token"]
    assert token and (job["env_token"] in (None, token)), "the front has a token"
    pids = job_pids(f"DSLAUNCH_JOB_ID={job['rec']['job_id']}")
    assert len(pids) >= 3, "shell wrapper, torchrun agent and the rank"
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert token.encode() not in environ and b"DSLAUNCH_TOKEN=" not in environ, pid
        assert token.encode() not in cmdline, pid
        assert CREDENTIAL.encode() not in environ, "the caller's credentials stay with the caller"
        assert b"MY_SETTING=reaches-the-job" in environ, "ordinary variables of the caller still reach the job"
    # and the front does require that token: query reads it from the record
    res = cli("query", "--health")
    assert res.returncode == 0 and '"ok": true' in res.stdout, res.stdout + res.stderr


def test_the_token_is_required_and_never_shown(job: dict[str, Any]) -> None:
    """Off loopback a token is required (generated when none is given): without it, or with a
    wrong one, the front refuses; the record has it (query works) and only 0600 files hold it."""
    cli: Cli = job["cli"]
    rec_path = Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json"
    rec = json.loads(rec_path.read_text())
    token, port = rec["front"]["token"], rec["front"]["port"]
    assert token and len(token) >= 32
    assert stat.S_IMODE(rec_path.stat().st_mode) == 0o600
    router = next(n for n in rec["nodes"] if n["kind"] == "router")
    for name in ("front.token", "replica.secret"):  # the public token and the router's link key
        assert stat.S_IMODE((Path(router["node_dir"]) / name).stat().st_mode) == 0o600
    with Client("127.0.0.1", port, retry_for=0) as c, pytest.raises(FrontError) as e:
        c.health()
    assert e.value.code == "unauthorized"
    with Client("127.0.0.1", port, token="x" * 40, retry_for=0) as c, pytest.raises(FrontError):
        c.generate("Hello")
    ok = cli("query", "Hello", "-k", "3")
    assert ok.returncode == 0, ok.stderr
    ps = subprocess.run(["ps", "axww", "-o", "args="], capture_output=True, text=True).stdout
    assert token not in ps
    logs = cli("logs", "--lines", "500")
    assert logs.returncode == 0 and token not in logs.stdout + logs.stderr


def test_ranks_are_forked_from_the_agent_or_executed_as_torchrun_does(job: dict[str, Any]) -> None:
    """`--rank-start fork` (the default where no GPU is): each rank is a child of the agent that
    never executed anything, yet `ps` shows it as the worker; `exec`: torchrun's own interpreter."""
    st = job["cli"]("status", "--json")
    assert st.returncode == 0, st.stderr
    forked = job["env_token"] is None
    for rank in json.loads(st.stdout)["ranks"]:
        pid = rank["pid"]
        agent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        agent_args = Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")
        shown = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()  # as `ps` shows it
        assert shown[1:] == [b"-u", b"-m", b"dslaunch.rank.worker"], shown
        module = b"dslaunch.rank.torchrun" if forked else b"torch.distributed.run"
        assert agent_args[1:3] == [b"-m", module], agent_args
        # torchrun hands an executed rank RANK, LOCAL_RANK, ... in the environment it executes
        # with; a forked rank's initial environment is its agent's, and they are set after the fork
        initial = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(v.startswith(b"LOCAL_RANK=") for v in initial) is not forked
        assert (initial == Path(f"/proc/{agent}/environ").read_bytes().split(b"\0")) is forked
