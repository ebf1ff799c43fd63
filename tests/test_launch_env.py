"""What reaches the ranks' environment, as DeepSpeed's launcher would set it: forwarded prefixes,
`.deepspeed_env` (expanded on the node), the launch directory, and CUDA_VISIBLE_DEVICES from the
selected slots. Unit tests of the rules; tests/test_openssh.py runs them on real nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node, select_nodes
from dslaunch.launch.plan import make_plan
from dslaunch.launch.spec import JobSpec, collect_user_env
from dslaunch.node.agent import expand_vars, job_env
from dslaunch.wire.rankenv import EXPAND_ENV, LAUNCH_DIR_ENV
from tests.conftest import Cli


def test_forwards_what_deepspeed_forwards(tmp_path: Path) -> None:
    launch = {
        "PYTHONPATH": "/src", "PYTHONHASHSEED": "0", "MLFLOW_TRACKING_URI": "http://m", "MV2_USE_CUDA": "1",
        "UCX_TLS": "tcp", "NCCL_DEBUG": "INFO", "HF_HOME": "/hf", "HOME": "/root", "SECRET": "x", "PATH": "/bin",
    }  # fmt: skip
    got = collect_user_env(launch, cwd=tmp_path, home=tmp_path).values
    assert set(got) == {"PYTHONPATH", "PYTHONHASHSEED", "MLFLOW_TRACKING_URI", "MV2_USE_CUDA", "UCX_TLS",
                        "NCCL_DEBUG", "HF_HOME"}  # fmt: skip


def test_ds_env_file_is_looked_up_in_home_then_the_working_directory(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "my_env").write_text("A=home\nB=home\n")
    (cwd / "my_env").write_text("B=cwd\n")
    env = collect_user_env({"DS_ENV_FILE": "my_env"}, cwd=cwd, home=home)
    assert env.values == {"A": "home", "B": "cwd"}
    assert env.sources["A"] == str(home / "my_env") and env.sources["B"] == str(cwd / "my_env")
    absolute = collect_user_env({"DS_ENV_FILE": str(home / "my_env")}, cwd=cwd, home=tmp_path)
    assert absolute.values == {"A": "home", "B": "home"}


def test_only_deepspeed_env_values_are_expanded(tmp_path: Path) -> None:
    (tmp_path / ".deepspeed_env").write_text("PATH=/opt/conda/bin:$PATH\nLD_LIBRARY_PATH=/opt/x:${LD_LIBRARY_PATH}\n"
                                             "PLAIN=x\nOVERRIDDEN=$HOME\n")  # fmt: skip
    flags = tmp_path / "flags.env"
    flags.write_text("FROM_FILE=$HOME\n")
    env = collect_user_env({}, ["OVERRIDDEN=$literal"], [str(flags)], cwd=tmp_path, home=tmp_path / "none")
    assert env.expand == ("PATH", "LD_LIBRARY_PATH")
    assert env.values["OVERRIDDEN"] == "$literal" and env.values["FROM_FILE"] == "$HOME"


def test_node_expands_against_its_own_environment() -> None:
    node = {"PATH": "/usr/bin:/bin", "HOME": "/home/u"}
    user = {"PATH": "/opt/conda/bin:$PATH", "LD_LIBRARY_PATH": "/opt/x:${LD_LIBRARY_PATH}", "KEEP": "$PATH",
            "REF": "$MINE/sub", "MINE": "/m", EXPAND_ENV: "PATH,LD_LIBRARY_PATH,REF,GONE"}  # fmt: skip
    env, cwd = job_env(node, user)
    assert env["PATH"] == "/opt/conda/bin:/usr/bin:/bin"
    assert env["LD_LIBRARY_PATH"] == "/opt/x:"  # unset: empty, as in a shell
    assert env["KEEP"] == "$PATH"  # not from .deepspeed_env: as written
    assert env["REF"] == "/m/sub" and EXPAND_ENV not in env and cwd is None
    assert expand_vars("$(rm -rf /) `id` ${A}${B}", {"A": "a"}) == "$(rm -rf /) `id` a", "nothing is run"


def test_launch_dir_first_on_pythonpath_where_it_exists(tmp_path: Path) -> None:
    env, cwd = job_env({"PYTHONPATH": "/node"}, {LAUNCH_DIR_ENV: str(tmp_path), "PYTHONPATH": "/user"})
    assert cwd == str(tmp_path) and env["PYTHONPATH"] == f"{tmp_path}:/user"
    env, cwd = job_env({}, {LAUNCH_DIR_ENV: str(tmp_path)})
    assert env["PYTHONPATH"] == str(tmp_path)
    env, cwd = job_env({"PYTHONPATH": "/node"}, {LAUNCH_DIR_ENV: str(tmp_path / "not-here")})
    assert cwd is None and env["PYTHONPATH"] == "/node" and LAUNCH_DIR_ENV not in env


NODES = [Node("w0", 4, line=1)]


def test_visible_devices_always_come_from_the_slots() -> None:
    for include, want in (("w0:1,3", "1,3"), ("w0", "0,1,2,3")):
        spec = JobSpec(nodes=select_nodes(NODES, include), python="/py")
        plan = make_plan(spec, "r", "10.0.0.1", 1, 2, "nccl")
        assert plan.nodes[0].env["CUDA_VISIBLE_DEVICES"] == want
        assert [r.device for r in plan.ranks] == [f"cuda:{i}" for i in want.split(",")]
    same = JobSpec(nodes=select_nodes(NODES, "w0:1,3"), env={"CUDA_VISIBLE_DEVICES": "1, 3"}, python="/py")
    assert make_plan(same, "r", "a", 1, 2, "nccl").nodes[0].env["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_a_conflicting_visible_devices_is_one_line() -> None:
    with pytest.raises(UserError) as e:
        JobSpec(nodes=select_nodes(NODES, "w0:1,3"), env={"CUDA_VISIBLE_DEVICES": "0,1"},
                env_sources={"CUDA_VISIBLE_DEVICES": "/home/u/.deepspeed_env"})  # fmt: skip
    assert e.value.message == (
        "CUDA_VISIBLE_DEVICES=0,1 (/home/u/.deepspeed_env) conflicts with the slots selected on w0 (1,3): "
        "dslaunch sets it from the slots; remove it and choose GPUs with --include 'w0:0,1'"
    )


def test_cli_spellings_and_the_implicit_localhost(cli: Cli, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=4 max_slots=4\ngpu-b slots=4\n")
    res = cli.up("-H", str(hosts), "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "10.9.9.9",
                 "--master_port", "29999", "--dry-run")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "10.9.9.9:29999" in res.stdout and "gpu-b" not in res.stdout
    # no hostfile, no GPU here: as many CPU ranks as asked for, where DeepSpeed would want GPUs
    for args in (["--num-gpus", "2"], ["-i", "localhost:0,1"]):
        res = cli.up(*args, "--dry-run")
        assert res.returncode == 0, res.stderr
        assert "WORLD_SIZE=2" in res.stdout, res.stdout
    assert "DSLAUNCH_LAUNCH_DIR=" in res.stdout
    assert "DSLAUNCH_LAUNCH_DIR=" not in cli.up("--no-launch-dir", "--dry-run").stdout
    conflict = cli.up("-i", "localhost:0", "--env", "CUDA_VISIBLE_DEVICES=1", "--dry-run")
    assert conflict.returncode == 1 and "conflicts with the slots selected on localhost (0)" in conflict.stderr
