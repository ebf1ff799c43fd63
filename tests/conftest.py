"""Shared fixtures: simulated SSH nodes, a CLI runner, and a guard that ends every job process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.simnodes import SESSION_ENV, SimCluster, node_port, sshd_available

REPO = Path(__file__).resolve().parent.parent
# The suite runs many ranks and in-process engines at once on a machine of few cores. OpenMP's
# default lets a thread that finished its share spin for its next one: with the cores taken by
# others, that spinning is most of the CPU (the 28M model, 16 rows beside one busy core: 12.6 s
# of CPU and 9.8 s wall against 4.4 s and 4.5 s passive). Set before torch loads its OpenMP; the
# simulated nodes' sshd sets it for their sessions (tests/simnodes.py), so their ranks get it.
os.environ.setdefault("OMP_WAIT_POLICY", SESSION_ENV["OMP_WAIT_POLICY"])
PROMPTS = ["Hello world", "Tensor parallel layers shard"]


_SHARED_SCOPES = {"module": 0, "package": 1}


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C must reach the CLIs the tests start: a suite started in the background of a shell
    without job control inherits SIGINT ignored, and every child would ignore it too (an ignored
    signal stays ignored across exec; a handled one is reset to the default)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under pytest-xdist (`--dist loadgroup`), keep the tests that share a module- or
    package-scoped fixture (a live job, a router kit, a built model) on one worker, so that
    fixture is built once; every other test is free to run on any worker.

    The group is the widest scope the test uses: the package's directory for a package-scoped
    fixture (tests/front/ shares one job), else the module's file. It is marked as each test is
    collected, before any `pytest_collection_modifyitems` (where xdist reads the groups) runs.
    """
    info = getattr(item, "_fixtureinfo", None)
    if info is None or item.get_closest_marker("xdist_group"):
        return
    scopes = {_SHARED_SCOPES[d.scope] for defs in info.name2fixturedefs.values() for d in defs[-1:]
              if d.scope in _SHARED_SCOPES}  # fmt: skip
    if scopes:
        where = item.path.parent if max(scopes) == _SHARED_SCOPES["package"] else item.path
        item.add_marker(pytest.mark.xdist_group(name=str(where.relative_to(REPO))))


def job_pids(marker: str) -> list[int]:
    """Pids whose environment contains `marker` (e.g. 'DSLAUNCH_JOB_ID=x' or a work-dir path)."""
    out = subprocess.run(["ps", "axeww", "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and marker in parts[2] and not parts[1].startswith("Z") and int(parts[0]) != os.getpid():
            pids.append(int(parts[0]))
    return pids


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every process carrying `marker`; returns what had to be killed."""
    pids = job_pids(marker)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return pids


def front_port() -> str:
    """A `--port` for a job's front that no other job on the machine is likely to want.

    The default is 7070 or the next free port: `up` finds it free, rank 0 binds it seconds later,
    and a job that another test run on the same machine starts in between can take it; after a
    restart the front listens again on the port it had, which may have been taken meanwhile. This
    one is picked at random outside the range the kernel hands out by itself, free on every
    address (a job that binds 0.0.0.0 collides with a simulated node's sshd on any 127.0.0.x).
    """
    return str(node_port(["0.0.0.0"]))


def job_dirs(work_dir: Path) -> list[str]:
    """What is left in a work dir besides the built-in model cache (shared by jobs, kept on purpose)."""
    return sorted(p.name for p in work_dir.iterdir() if p.name != "models")


def rank_hook(tmp_path: Path, when: str, do: str) -> list[str]:
    """`up` arguments that make rank processes run `do` at start-up where `when` holds.

    It is a sitecustomize module on PYTHONPATH (imported before anything else); `os`, `sys` and
    `time` are imported for the two expressions. Only rank processes have LOCAL_RANK set. An
    interpreter runs it as it starts, so the ranks are executed (`--rank-start exec`), not forked
    from an agent that started long before.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import os, sys, time\nif {when}:\n    {do}\n")
    return ["--rank-start", "exec", "--env", f"PYTHONPATH={site}"]


class Cli:
    """Runs `python -m dslaunch ...` as a user would, in a private DSLAUNCH_HOME and work dir."""

    def __init__(self, env: dict[str, str], work_dir: Path) -> None:
        self.env = env
        self.work_dir = work_dir

    def __call__(self, *args: str, timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dslaunch", *args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, input=input,
        )  # fmt: skip

    def up(self, *args: str, timeout: float = 240, own_port: bool = True) -> subprocess.CompletedProcess[str]:
        """`up` in this runner's work dir; the front gets a port of its own (`front_port`) unless
        the test gives one or asks for the default (own_port=False).

        One router unless the test asks for more (`--routers`): the standby router is what
        tests/test_replicas.py and tests/test_slurm.py are about; elsewhere it would be one more
        process per job on a 2-core machine that runs six jobs at once.
        """
        live = "--dry-run" not in args
        port = ["--port", front_port()] if own_port and "--port" not in args and live else []
        routers = ["--routers", "1"] if "--routers" not in args and live else []
        return self("up", "--work-dir", str(self.work_dir), *port, *routers, *args, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dslaunch", *args], env=self.env, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip


def status_json(cli: Cli, name: str = "default") -> dict[str, Any]:
    """`dslaunch status --json` for a job, which must succeed."""
    res = cli("status", "--name", name, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _state_files(work_dir: Path) -> set[tuple[str, int, int]]:
    """The files on the nodes that change with a job's state, with their mtime and size: the ranks'
    status files and the agents' pid and exit files (not the front's, rewritten every second)."""
    out = set()
    for pattern in ("*/node*/ranks/*.json", "*/node*/agent.pid", "*/node*/agent.exit"):
        for p in work_dir.glob(pattern):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.add((str(p), st.st_mtime_ns, st.st_size))
    return out


def wait_status(cli: Cli, pred: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    """Ask `status --json` until `pred` holds (or the time-out); returns the last status.

    Each `status` is a process and an SSH round to every node, costly on a small machine where
    the ranks being waited for need the CPU: ask again when a state file of the job changed (the
    simulated nodes share this file system), or every 2 s for what leaves no file (a lost node).
    """
    deadline = time.monotonic() + timeout
    seen = _state_files(cli.work_dir)
    st = status_json(cli)
    while not pred(st) and time.monotonic() < deadline:
        ask_by = min(deadline, time.monotonic() + 2)
        time.sleep(0.2)
        while (now := _state_files(cli.work_dir)) == seen and time.monotonic() < ask_by:
            time.sleep(0.1)
        seen = now
        st = status_json(cli)
    return st


def plain_generate(model_dir: Path, prompts: list[str], k: int) -> list[str]:
    """The plain transformers model in this process: greedy, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def local_job(
    tmp_path_factory: pytest.TempPathFactory, *up_args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[Cli, dict[str, Any]]]:
    """A localhost job for a whole module (no sshd): yields the CLI runner and the job record.

    `env` is added to the CLI's environment (e.g. DSLAUNCH_TOKEN).
    """
    tmp = tmp_path_factory.mktemp("job")
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSLAUNCH_")}
    env.update(DSLAUNCH_HOME=str(tmp / "home"), COLUMNS="200", **extra)
    (tmp / "work").mkdir(mode=0o700)
    cli = Cli(env, tmp / "work")
    try:
        res = cli.up(*up_args)  # Cli.up gives the front a port of its own
        assert res.returncode == 0, res.stdout + res.stderr
        yield cli, json.loads((tmp / "home" / "jobs" / "default.json").read_text())
    finally:
        guard(cli)


def guard(cli: Cli) -> None:
    """After a test: `down` every recorded job, then kill anything still carrying the work dir."""
    home = Path(cli.env["DSLAUNCH_HOME"]) / "jobs"
    for rec in home.glob("*.json") if home.exists() else []:
        with contextlib.suppress(subprocess.TimeoutExpired):
            cli("down", "--name", rec.stem, "--grace", "3", timeout=60)
    time.sleep(0.1)
    kill_marked(f"DSLAUNCH_NODE_DIR={cli.work_dir}")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Two simulated nodes (sshd on 127.0.0.2 and 127.0.0.3)."""
    yield from _sim(tmp_path, 2)


@pytest.fixture
def sim3(tmp_path: Path) -> Iterator[SimCluster]:
    yield from _sim(tmp_path, 3)


@contextlib.contextmanager
def sim_nodes(tmp_path: Path, n: int, **kw: object) -> Iterator[SimCluster]:
    """`n` simulated nodes under `tmp_path/sim`, stopped on the way out (skips without sshd)."""
    if not sshd_available():
        if os.environ.get("CI"):
            pytest.fail("sshd is not installed (apt-get install openssh-server)")
        pytest.skip("sshd is not installed")
    cluster = SimCluster(tmp_path / "sim", n, **kw).start()  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.stop()


def _sim(tmp_path: Path, n: int, **kw: object) -> Iterator[SimCluster]:
    with sim_nodes(tmp_path, n, **kw) as cluster:
        yield cluster


def ssh_job(
    tmp_path_factory: pytest.TempPathFactory, *up_args: str, nodes: int = 2, slots: int = 1
) -> Iterator[tuple[SimCluster, Cli, subprocess.CompletedProcess[str]]]:
    """A job on simulated nodes for a whole module, for tests that only read it or put back what
    they change: yields the nodes, the CLI runner and what `up` printed (it must have succeeded)."""
    tmp = tmp_path_factory.mktemp("sshjob")
    with sim_nodes(tmp, nodes) as cluster:
        (tmp / "work").mkdir()
        cli = Cli(cluster.env(), tmp / "work")
        try:
            res = cli.up("-H", str(cluster.hostfile(slots=slots)), *up_args)
            assert res.returncode == 0, res.stdout + res.stderr
            yield cluster, cli, res
        finally:
            guard(cli)


@pytest.fixture
def cli(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cli]:
    """A CLI runner; uses the `sim` nodes' HOME when the test also asked for simulated nodes."""
    sim_fixture = next((f for f in ("sim", "sim3") if f in request.fixturenames), None)
    if sim_fixture:
        env = request.getfixturevalue(sim_fixture).env()
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSLAUNCH_")}
        env.update(DSLAUNCH_HOME=str(tmp_path / "dshome"), COLUMNS="200")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    runner = Cli(env, work)
    try:
        yield runner
    finally:
        guard(runner)
