"""The launch plan (pure): ranks, devices, agent command, environment and init URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node, select_nodes
from dslaunch.launch.plan import choose_backend, make_plan
from dslaunch.launch.spec import JobSpec, collect_env, parse_env_pairs, read_env_file

NODES = [Node("n0", 2, line=1), Node("n1", 3, line=2)]


def _plan(**kw):
    spec = JobSpec(nodes=kw.pop("nodes", NODES), python="/opt/py", **kw)
    return make_plan(spec, "r1", "10.0.0.1", 29500, 29400, kw.get("backend", "gloo"), ["10.0.0.1", "10.0.0.2"])


def test_world_and_ranks_follow_hostfile_order() -> None:
    plan = _plan()
    assert plan.world_size == 5
    assert [(r.rank, r.node_rank, r.local_rank, r.host) for r in plan.ranks] == [
        (0, 0, 0, "n0"), (1, 0, 1, "n0"), (2, 1, 0, "n1"), (3, 1, 1, "n1"), (4, 1, 2, "n1"),
    ]  # fmt: skip
    assert [n.rank_offset for n in plan.nodes] == [0, 2]
    assert all(r.device == "cpu" for r in plan.ranks)


def test_agent_command_is_torchrun_with_c10d_hosted_on_node0() -> None:
    plan = _plan()
    a0, a1 = plan.nodes[0].argv, plan.nodes[1].argv
    assert a0[:3] == ("/opt/py", "-m", "dslaunch.rank.torchrun")  # torchrun's flags and agent, ranks forked
    assert a0[a0.index("--nnodes") + 1] == "2"
    assert a0[a0.index("--nproc-per-node") + 1] == "2" and a1[a1.index("--nproc-per-node") + 1] == "3"
    assert a1[a1.index("--node-rank") + 1] == "1"
    assert a0[a0.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert a0[a0.index("--rdzv-conf") + 1].startswith("is_host=1")
    assert a1[a1.index("--rdzv-conf") + 1].startswith("is_host=0")
    assert a0[a0.index("--max-restarts") + 1] == "3"
    assert a1[a1.index("--local-addr") + 1] == "10.0.0.2"
    assert a0[-2:] == ("-m", "dslaunch.rank.worker")
    assert a0[a0.index("--rdzv-id") + 1] == plan.job_id == "default-r1"
    plain = _plan(rank_start="exec").nodes[0].argv
    assert plain[:3] == ("/opt/py", "-m", "torch.distributed.run") and plain[3:] == a0[3:]


def test_environment_per_node() -> None:
    plan = _plan(env={"NCCL_DEBUG": "INFO", "MY": "x"})
    e1 = plan.nodes[1].env
    assert e1["MASTER_ADDR"] == "10.0.0.1" and e1["MASTER_PORT"] == "29500"
    assert e1["WORLD_SIZE"] == "5" and e1["LOCAL_WORLD_SIZE"] == "3" and e1["LOCAL_SIZE"] == "3"
    assert e1["DSLAUNCH_RANK_OFFSET"] == "2" and e1["DSLAUNCH_NODE_RANK"] == "1"
    assert e1["DSLAUNCH_JOB_ID"] == "default-r1"
    assert e1["NCCL_DEBUG"] == "INFO" and e1["MY"] == "x"
    assert e1["DSLAUNCH_AUTO_THREADS"] == "1"
    assert "DSLAUNCH_AUTO_THREADS" not in _plan(env={"OMP_NUM_THREADS": "4"}).nodes[0].env


@pytest.mark.parametrize(
    ("method", "url"),
    [("tcp", "tcp://10.0.0.1:29500"), ("env", "env://"), ("file", "file:///nfs/rdzv/default-r1-{restart}")],
)
def test_init_urls(method: str, url: str) -> None:
    kw = {"rdzv_dir": "/nfs/rdzv/"} if method == "file" else {}
    assert _plan(init_method=method, **kw).init_url == url


def test_nccl_devices_and_visible_devices_for_a_slot_subset() -> None:
    nodes = select_nodes([Node("n0", 4), Node("n1", 2)], include="n0:1,3@n1")
    plan = make_plan(JobSpec(nodes=nodes), "r", "a", 1, 2, "nccl", ["a", "b"])
    assert [r.device for r in plan.ranks] == ["cuda:1", "cuda:3", "cuda:0", "cuda:1"]
    assert plan.nodes[0].env["CUDA_VISIBLE_DEVICES"] == "1,3"
    # every slot of n1: set all the same, so a value inherited on the node cannot move the ranks
    assert plan.nodes[1].env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_choose_backend() -> None:
    assert choose_backend("auto", [2, 2], [2, 2]) == "nccl"
    assert choose_backend("auto", [2, 0], [2, 1]) == "gloo"
    assert choose_backend("auto", [1], [2]) == "gloo"
    assert choose_backend("gloo", [8], [1]) == "gloo"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"init_method": "file"}, "--init-method file needs --rdzv-dir"),
        ({"init_method": "file", "rdzv_dir": "rel/dir"}, "--rdzv-dir 'rel/dir': must be an absolute path"),
        ({"rdzv_dir": "/x"}, "--rdzv-dir is only used with --init-method file"),
        ({"init_method": "mpi"}, "--init-method 'mpi': choose one of tcp, file, env"),
        ({"name": "bad name"}, "--name 'bad name'"),
        ({"master_port": 70000}, "--master-port 70000: not a TCP port"),
        ({"master_port": 5, "rdzv_port": 5}, "--master-port and --rdzv-port must differ"),
        ({"max_restarts": -1}, "--max-restarts -1: must be 0 or more"),
        ({"ready_timeout": 0}, "--timeout 0: must be more than 0 seconds"),
        ({"env": {"1BAD": "x"}}, "--env '1BAD'"),
    ],
)
def test_spec_rejects_bad_combinations(kw: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        JobSpec(nodes=NODES, **kw)
    assert e.value.message.startswith(message), e.value.message


def test_env_sources_and_precedence(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("# comment\nB=cwd\nC='quoted'\n")
    envfile = tmp_path / "extra.env"
    envfile.write_text("export C=file\nD=file\n")
    got = collect_env(
        {"NCCL_IB_DISABLE": "1", "HOME": "/x", "SECRET": "no", "D": "launch"},
        ["D=flag"], [str(envfile)], cwd=cwd, home=home,
    )  # fmt: skip
    assert got == {"NCCL_IB_DISABLE": "1", "A": "home", "B": "cwd", "C": "file", "D": "flag"}


def test_env_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--env 'novalue': expected KEY=VALUE"):
        parse_env_pairs(["novalue"])
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\nthis is not\n")
    with pytest.raises(UserError, match=r"bad.env:2: expected KEY=VALUE"):
        read_env_file(bad)


def test_restart_back_off_starts_at_the_second_restart_and_doubles() -> None:
    from dslaunch.wire.restarts import MAX_BACKOFF_S, backoff_delay

    assert [backoff_delay(1.5, a) for a in range(6)] == [0, 0, 1.5, 3, 6, 12]
    assert backoff_delay(1, 30) == MAX_BACKOFF_S
    assert backoff_delay(0, 5) == 0
    with pytest.raises(UserError, match="--restart-backoff"):
        JobSpec(nodes=[Node("a", 1)], restart_backoff=-1)
    env = make_plan(JobSpec(nodes=[Node("a", 1)], restart_backoff=2.5), "r", "a", 1, 2, "gloo").nodes[0].env
    assert env["DSLAUNCH_RESTART_BACKOFF"] == "2.5"
    assert env["DSLAUNCH_RESTART_WINDOW"] == "600"  # the agent renews its budget after that long healthy
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(UserError, match="--restart-window"):
            JobSpec(nodes=[Node("a", 1)], restart_window=bad)
