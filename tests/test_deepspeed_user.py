"""A DeepSpeed user's setup, on two simulated SSH nodes: node 0 behind a ProxyCommand bastion, a
`--handler` module in the launch directory, `.deepspeed_env` extending the node's PATH, MLFLOW_*
in the environment. One job; every rank reports what it got."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Cli, front_port
from tests.simnodes import SimCluster
from tests.test_openssh import proxy_command_config

pytestmark = pytest.mark.ssh

HANDLER = """
import os


class Report:
    def load(self, ctx):
        self.ctx = ctx

    def __call__(self, batch):
        import torch.distributed as dist

        mine = {"rank": self.ctx.rank, "cwd": os.getcwd(), "path": os.environ["PATH"],
                "pythonpath": os.environ.get("PYTHONPATH", ""), "mlflow": os.environ.get("MLFLOW_RUN_NAME"),
                "mark": os.environ.get("DS_MARK"), "master": os.environ["MASTER_ADDR"]}
        every = [None] * self.ctx.world_size
        dist.all_gather_object(every, mine)
        return [every for _ in batch]
"""


def test_deepspeed_user_setup_behind_a_proxy_command(sim: SimCluster, cli: Cli, tmp_path: Path) -> None:
    launch = tmp_path / "project"
    launch.mkdir()
    (launch / "report_handler.py").write_text(HANDLER)
    (launch / ".deepspeed_env").write_text("PATH=/opt/ds-test/bin:$PATH\nDS_MARK=${NOT_SET_ANYWHERE}mark\n")
    (sim.ssh_dir / "config").write_text(
        proxy_command_config(sim, target=0, via=1) + (sim.ssh_dir / "config").read_text()
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("head slots=1\nnode1 slots=1\n")
    env = {**cli.env, "MLFLOW_RUN_NAME": "run-7", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "dslaunch", "up", "-H", str(hosts), "--work-dir", str(cli.work_dir),
         "--handler", "report_handler:Report", "--timeout", "120", "--port", front_port()],
        cwd=launch, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"note: the ranks run in {launch}, first on PYTHONPATH, on every node" in res.stderr
    q = cli("query", "--infer", "{}")
    assert q.returncode == 0, q.stderr
    ranks = json.loads(q.stdout)["result"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["cwd"] == str(launch)
        assert r["pythonpath"].split(os.pathsep)[:2] == [str(launch), str(REPO)]
        path = r["path"].split(os.pathsep)
        assert path[0] == "/opt/ds-test/bin" and "/usr/bin" in path, "extends the node's own PATH"
        assert r["mlflow"] == "run-7" and r["mark"] == "mark"
        assert r["master"] not in ("", "unknown", "None")
