"""The command line as a user meets it: help, dry run, and one-line errors without tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli


def _one_line_error(res, fragment: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert fragment in lines[0], res.stderr


def test_help_has_examples(cli: Cli) -> None:
    res = cli("up", "--help")
    assert res.returncode == 0
    assert "Examples:" in res.stdout and "--init-method [tcp|file|env]" in res.stdout
    for cmd in ("status", "down", "logs"):
        assert "Examples:" in cli(cmd, "--help").stdout


@pytest.mark.parametrize(
    ("hostfile", "args", "fragment"),
    [
        ("a slots=2\na slots=1\n", [], "hosts:2: host 'a' is listed twice"),
        ("a slots=x\n", [], "hosts:1: slots='x' is not a whole number"),
        ("a slots=2\n", ["--include", "b"], "--include 'b': host 'b' is not in the hostfile"),
        ("a slots=2\n", ["--init-method", "file"], "--init-method file needs --rdzv-dir"),
        ("a slots=2\n", ["--env", "NOEQUALS"], "--env 'NOEQUALS': expected KEY=VALUE"),
        ("a slots=2\n", ["--name", "no/slash"], "--name 'no/slash'"),
        ("a slots=2\nb slots=2\n", ["--routers", "3"], "--routers 3: the job has 2 node(s)"),
    ],
)
def test_user_errors_are_one_line(cli: Cli, tmp_path: Path, hostfile: str, args: list[str], fragment: str) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(hostfile)
    res = cli.up("--hostfile", str(hosts), *args, "--dry-run")
    _one_line_error(res, fragment)


def test_missing_hostfile(cli: Cli, tmp_path: Path) -> None:
    _one_line_error(cli.up("--hostfile", str(tmp_path / "nope")), "hostfile not found")


def test_unknown_init_method_or_launcher_is_refused_naming_the_choices(cli: Cli) -> None:
    # the choices are the registries' (wire/initmethods, transport/launchers), not a fixed list
    _one_line_error(cli.up("--init-method", "mpi"), "--init-method 'mpi': choose one of tcp, file, env")
    _one_line_error(cli.up("--launcher", "pbs"), "--launcher 'pbs': choose one of local, ssh, slurm")


def test_status_logs_without_a_job(cli: Cli) -> None:
    _one_line_error(cli("status"), "no job named 'default'")
    _one_line_error(cli("logs"), "no job named 'default'")
    res = cli("down")
    assert res.returncode == 0 and "nothing to stop" in res.stdout


def test_dry_run_prints_the_plan_without_touching_nodes(cli: Cli, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=2\nbob@gpu-b slots=2\n")  # names that do not resolve: nothing is contacted
    res = cli.up("-H", str(hosts), "--init-method", "file", "--rdzv-dir", "/nfs/r", "--env", "NCCL_DEBUG=INFO",
                 "--dry-run")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "world size" in out and "4" in out
    assert "dslaunch.rank.torchrun" in out and "--node-rank 1" in out
    assert "file:///nfs/r/default-dryrun00-{restart}" in out
    assert "NCCL_DEBUG=INFO" in out and "LOCAL_SIZE=2" in out
    assert "gpu-b" in out
    # two nodes: a router on each, the second on gpu-b with the next public port
    assert "router 0 on gpu-a: public front port 7070" in out and "router 1 on gpu-b: public front port 7071" in out
    assert not (Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").exists()


def test_version(cli: Cli) -> None:
    res = cli("--version")
    assert res.returncode == 0 and "dslaunch, version" in res.stdout
