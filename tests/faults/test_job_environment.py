"""The front's token never reaches the environment of a job's processes on localhost.

The local transport runs nodectl as a child of the CLI, and nodectl passes its environment on to
the agent: whatever the CLI's environment held would sit in `/proc/<pid>/environ` of every job
process. Checked with the token from DSLAUNCH_TOKEN and with a generated one (`--bind 0.0.0.0`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, job_pids, local_job

CREDENTIAL = "ghp_" + "x" * 30  # another secret of the caller's shell


@pytest.fixture(scope="module", params=["DSLAUNCH_TOKEN", "generated"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {"GITHUB_TOKEN": CREDENTIAL, "MY_SETTING": "reaches-the-job"}
    args: list[str] = []
    if request.param == "DSLAUNCH_TOKEN":
        env["DSLAUNCH_TOKEN"] = secrets.token_urlsafe(32)
    else:
        args = ["--bind", "0.0.0.0"]
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
