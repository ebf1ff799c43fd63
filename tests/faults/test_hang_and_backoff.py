"""A rank that hangs (alive, not answering) restarts the job; repeated crashes back off; status
keeps the reason of the last failure after the job is ready again."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError
from tests.conftest import Cli, front_port, job_pids, status_json, wait_status
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


def _front_port(cli: Cli) -> int:
    rec = json.loads((Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
    return int(rec["front"]["port"])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()[0]
    except OSError:
        return True
    return state in (b"Z", b"X")


def test_a_stopped_rank_is_declared_hung_and_the_job_restarts(sim: SimCluster, cli: Cli) -> None:
    up = cli.up("-H", str(sim.hostfile(slots=1)), "--hang-timeout", "4", "--heartbeat", "1", "--port", front_port())
    assert up.returncode == 0, up.stdout + up.stderr
    st = status_json(cli)
    victim = st["ranks"][1]["pid"]
    port = _front_port(cli)
    os.kill(victim, signal.SIGSTOP)  # alive, holds its sockets open, never answers: no error will come
    first: dict[str, Any] = {}

    def caught_in_the_hang() -> None:
        with Client("127.0.0.1", port, retry_for=0, timeout=150) as c:
            try:
                first.update(c.generate("Hello", max_new_tokens=4))
            except FrontError as e:
                first.update(code=e.code, message=str(e))

    asker = threading.Thread(target=caught_in_the_hang, daemon=True)
    asker.start()
    try:
        # The restart sends the stopped rank SIGTERM (torch's stop), which a stopped process only
        # takes once it runs again: the agent sends SIGCONT too, so torch need not sit out its 30 s
        # grace and SIGKILL it (it logs "Unable to shutdown process ... via SIGTERM" when it does)
        asker.join(160)
        # the request caught in the hang was not lost: the router ran it again once the job was back
        assert first.get("tokens") == 4, first
        with Client("127.0.0.1", port, retry_for=0, timeout=60) as c:
            again = c.generate("Hello", max_new_tokens=4)
        assert again["tokens"] == 4
        st = wait_status(cli, lambda s: s["state"] == "ready" and all(r["restarts"] == 1 for r in s["ranks"]))
        assert st["state"] == "ready", st
        assert _gone(victim), "the stopped rank was ended by the restart"
        agent_log = "".join(p.read_text(errors="replace") for p in cli.work_dir.glob("*/node*/agent.log"))
        assert "SIGTERM" in agent_log, "the agent's log shows the gang's stop"
        assert "Unable to shutdown process" not in agent_log, "the stopped rank took SIGTERM: no SIGKILL was needed"
        last = st["last_failure"]
        assert last["rank"] == 0 and last["exit_code"] == 75, last
        assert "not responding" in last["last_line"], last
        shown = cli("status").stdout
        assert "last failure" in shown and "not responding" in shown, shown
        assert cli("down").returncode == 0
        assert job_pids(f"DSLAUNCH_JOB_ID=default-{st['run_id']}") == []
    finally:
        if not _gone(victim):
            os.kill(victim, signal.SIGKILL)


FLAKY = '''
import os


class Flaky:
    """Loads fine until the marker file exists; then rank 1 fails on every start."""

    task = "infer"
    name = "flaky"

    def load(self, ctx):
        self.ctx = ctx
        if ctx.rank == 1 and os.path.exists(os.environ["FLAKY_MARKER"]):
            raise RuntimeError("flaky handler: refusing to load on rank 1")

    def __call__(self, batch):
        return batch
'''


def test_repeated_crashes_back_off_and_status_keeps_the_reason(sim: SimCluster, cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "flaky_handler.py").write_text(FLAKY)
    marker = tmp_path / "crash-now"
    up = cli.up(
        "-H", str(sim.hostfile(slots=1)), "--handler", "flaky_handler:Flaky", "--max-restarts", "3",
        "--restart-backoff", "1", "--restart-window", "3", "--env", f"PYTHONPATH={tmp_path}",
        "--env", f"FLAKY_MARKER={marker}", "--port", front_port(),
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    st = status_json(cli)
    assert st["last_failure"] == {}
    # one crash, then 3 s healthy (--restart-window): the budget and the back-off start again there
    os.kill(st["ranks"][1]["pid"], signal.SIGKILL)
    wait_status(cli, lambda s: s["state"] == "ready" and all(r["restarts"] == 1 for r in s["ranks"]))
    node1 = next(cli.work_dir.glob("*/node1"))

    def renewed() -> bool:
        agent = (node1 / "agent.log").read_text(errors="replace")
        return "restart budget renewed: 3 restarts again" in agent and (node1 / "ranks" / "rank1.renewed").exists()

    deadline = time.monotonic() + 60
    while not renewed():
        assert time.monotonic() < deadline, "the restart budget was not renewed"
        time.sleep(0.2)
    marker.touch()
    t0 = time.monotonic()
    os.kill(wait_status(cli, lambda s: True)["ranks"][1]["pid"], signal.SIGKILL)
    # node 1's agent gives up after 3 more restarts: attempt 2 at once (the first since the
    # renewal), then 1 s and 2 s of back-off; without the renewal it would have had 2 left
    st = wait_status(cli, lambda s: not s["nodes"][1]["agent_alive"], timeout=150)
    assert not st["nodes"][1]["agent_alive"], st
    assert time.monotonic() - t0 > 3, "the back-off was not applied"
    logs = cli("logs", "--rank", "1", "--lines", "400").stdout
    assert "backing off 1s before attempt 3" in logs and "backing off 2s before attempt 4" in logs, logs
    assert "backing off" not in logs.split("attempt 2 on")[1].split("--- rank")[0], "the 1st restart waits"
    assert "attempt 5 on" not in logs, "3 restarts after the renewal, no more"
    last = st["last_failure"]
    assert last["rank"] == 1 and last["host"] == "node1" and last["exit_code"] == 1, last
    assert "refusing to load" in last["last_line"], last
    assert "refusing to load" in cli("status").stdout
    assert cli("down", "--grace", "5").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID=default-{st['run_id']}") == []
