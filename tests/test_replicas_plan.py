"""Replicas in the plan (pure): placement, one gang per replica, ports on each head, the router."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node
from dslaunch.launch.plan import make_plan
from dslaunch.launch.preflight import assign_ports, port_requests
from dslaunch.launch.replicas import place
from dslaunch.launch.spec import JobSpec
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.routerenv import RouterEnv

TWO_BY_TWO = [Node("a", 2, line=1), Node("b", 2, line=2)]


def _plan(nodes: list[Node], tp: int | None, backend: str = "gloo", **kw):
    spec = JobSpec(nodes=nodes, python="/opt/py", tp=tp, **kw)
    addrs = [f"10.0.0.{i + 1}" for i in range(len(nodes))]
    ports = [(29500 + 10 * r, 29400 + 10 * r) for r in range(len(spec.replicas))]
    return spec, make_plan(spec, "r1", addrs[0], 29500, 29400, backend, addrs, 7070, ports, 29999)


def _arg(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_two_nodes_of_two_slots_with_tp2_is_one_replica_per_node() -> None:
    _, plan = _plan(TWO_BY_TWO, 2)
    layout = [(rp.replica, rp.head, rp.units, rp.first_rank) for rp in plan.replicas]
    assert layout == [(0, 0, (0,), 0), (1, 1, (1,), 2)]
    for np_, rp in zip(plan.nodes, plan.replicas, strict=True):
        argv = np_.argv
        assert _arg(argv, "--nnodes") == "1" and _arg(argv, "--node-rank") == "0"
        assert _arg(argv, "--rdzv-endpoint") == f"{rp.master_addr}:{rp.rdzv_port}"
        assert _arg(argv, "--rdzv-id") == f"{plan.job_id}-r{rp.replica}"
        env = NodeEnv.from_env(np_.env)
        assert (env.world_size, env.rank_offset, env.replica, env.replicas) == (2, 0, rp.replica, 2)
        assert env.master_addr == rp.master_addr and env.master_port == rp.master_port
        assert env.routers == ("10.0.0.1:29999", "10.0.0.2:30000") and env.marker == str(np_.unit)
    assert plan.replicas[1].master_addr == "10.0.0.2" and plan.replicas[1].init_url == "tcp://10.0.0.2:29510"
    assert [(r.rank, r.replica) for r in plan.ranks] == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_tp_across_nodes_is_one_gang_spanning_them() -> None:
    _, plan = _plan([Node("a", 1, line=1), Node("b", 1, line=2)], 2)
    assert len(plan.replicas) == 1 and plan.replicas[0].units == (0, 1)
    a, b = plan.nodes
    assert _arg(a.argv, "--nnodes") == "2" and _arg(b.argv, "--node-rank") == "1"
    assert _arg(a.argv, "--rdzv-id") == plan.job_id  # one replica: the job's own rendezvous id, as before
    assert NodeEnv.from_env(b.env).rank_offset == 1


def test_default_is_every_rank_in_one_replica() -> None:
    spec, plan = _plan(TWO_BY_TWO, None)
    assert spec.tp_size == 4 and len(plan.replicas) == 1 and len(plan.nodes) == 2
    assert [n.unit for n in plan.nodes] == [0, 1] and plan.nodes[1].node_dir.endswith("/node1")


def test_two_replicas_on_one_node_get_two_agents_and_their_own_devices() -> None:
    _, plan = _plan([Node("a", 4, line=1)], 2, backend="nccl")
    assert len(plan.nodes) == 2 and {n.host for n in plan.nodes} == {"a"}
    assert [n.env["CUDA_VISIBLE_DEVICES"] for n in plan.nodes] == ["0,1", "2,3"]
    assert [n.env["DSLAUNCH_NODE_RANK"] for n in plan.nodes] == ["0", "1"]  # distinct markers on one host
    assert plan.nodes[0].node_dir != plan.nodes[1].node_dir


def test_file_init_gets_a_rendezvous_file_per_replica(tmp_path) -> None:
    _, plan = _plan(TWO_BY_TWO, 2, init_method="file", rdzv_dir=str(tmp_path))
    urls = [rp.init_url for rp in plan.replicas]
    assert urls[0] != urls[1] and all("{restart}" in u for u in urls)


def test_router_plan_runs_under_its_supervisor_with_the_job_marker() -> None:
    _, plan = _plan(TWO_BY_TWO, 2)
    assert plan.router is not None
    argv = plan.router.argv
    assert argv[1:4] == ("-m", "dslaunch.node.supervise", "--") and argv[-2:] == ("-m", "dslaunch.serving.router")
    renv = RouterEnv.from_env(plan.router.env)
    assert (renv.replicas, renv.tp, renv.link_bind, renv.link_port, renv.unit) == (2, 2, "10.0.0.1", 29999, 2)
    assert renv.serve.port == 7070 and renv.job_id == plan.job_id


@pytest.mark.parametrize(("tp", "why"), [(3, "choose one of 1, 2, 4"), (0, "must be at least 1"), (5, "1, 2, 4")])
def test_a_tp_that_does_not_divide_the_ranks_is_one_clear_error(tp: int, why: str) -> None:
    with pytest.raises(UserError, match=f"--tp {tp}") as e:
        JobSpec(nodes=TWO_BY_TWO, tp=tp)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_ports_are_asked_of_each_replicas_head_and_assigned_in_order() -> None:
    spec = JobSpec(nodes=[Node("a", 3, line=1), Node("b", 3, line=2)], tp=2)  # replicas: a, a+b, b
    want = port_requests(spec)
    assert want == [[None, None, None, None], [None, None]]
    assert assign_ports(spec, [[1, 2, 3, 4], [6, 7]]) == [(1, 2), (3, 4), (6, 7)]
    fixed = JobSpec(nodes=TWO_BY_TWO, tp=2, master_port=5000, rdzv_port=5001)
    assert port_requests(fixed)[0][:2] == [5000, 5001]


@given(slots=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_placement_covers_every_rank_once_in_hostfile_order(slots: list[int], data: st.DataObject) -> None:
    nodes = [Node(f"h{i}", s, line=i + 1) for i, s in enumerate(slots)]
    world = sum(slots)
    tp = data.draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    reps = place(nodes, tp)
    assert len(reps) == world // tp
    units = [u for r in reps for u in r.units]
    assert [u.unit for u in sorted(units, key=lambda u: u.rank_offset)] == list(range(len(units)))
    ranks = [u.rank_offset + k for u in units for k in range(u.nprocs)]
    assert sorted(ranks) == list(range(world))
    for r in reps:
        assert sum(u.nprocs for u in r.units) == tp
        assert [u.gang_node for u in r.units] == list(range(len(r.units)))
        assert [u.gang_offset for u in r.units] == [u.rank_offset - r.first_rank for u in r.units]
        # a replica stays on one node whenever it fits in that node's remaining slots
        if tp <= min(slots) and all(s % tp == 0 for s in slots):
            assert len(r.units) == 1


@pytest.mark.parametrize(("nodes", "routers", "want"), [(1, None, 1), (2, None, 2), (3, None, 2), (2, 1, 1), (3, 3, 3)])
def test_routers_default_to_two_with_two_nodes_and_run_one_per_node(nodes: int, routers: int | None,
                                                                    want: int) -> None:  # fmt: skip
    hosts = [Node(f"h{i}", 2, line=i + 1) for i in range(nodes)]
    spec = JobSpec(nodes=hosts, tp=2, routers=routers)
    assert spec.router_count == want
    addrs = [f"10.0.0.{i + 1}" for i in range(nodes)]
    ports = [(7070 + k, 29990 + k) for k in range(want)]
    plan = make_plan(spec, "r1", addrs[0], 29500, 29400, "gloo", addrs, 7070, None, 29990, ports)
    assert [(rp.index, rp.node, rp.host, rp.front_port) for rp in plan.routers] == [
        (k, k, f"h{k}", 7070 + k) for k in range(want)
    ]
    # each router is a unit after the agents, with a directory and a link address of its own
    assert [rp.unit for rp in plan.routers] == [len(plan.nodes) + k for k in range(want)]
    assert len({rp.node_dir for rp in plan.routers}) == want and plan.routers[0].node_dir.endswith("/router")
    for k, rp in enumerate(plan.routers):
        renv = RouterEnv.from_env(rp.env)
        assert (renv.link_bind, renv.link_port, renv.serve.port, renv.unit) == (addrs[k], 29990 + k, 7070 + k, rp.unit)
    # every replica leader dials every router
    for np_ in plan.nodes:
        assert NodeEnv.from_env(np_.env).routers == tuple(f"{addrs[k]}:{29990 + k}" for k in range(want))


@pytest.mark.parametrize(("routers", "why"), [(0, "must be at least 1"), (3, "the job has 2 node(s)")])
def test_routers_beyond_the_nodes_is_one_clear_error(routers: int, why: str) -> None:
    with pytest.raises(UserError, match=f"--routers {routers}") as e:
        JobSpec(nodes=TWO_BY_TWO, routers=routers)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_each_router_node_is_asked_for_its_own_public_and_link_ports() -> None:
    """Router K's public port is --port + K (or scanned from 7070 + K in steps of the router count),
    so routers of simulated nodes sharing one machine never collide."""
    from dslaunch.node.probe import _front_port

    got = _front_port("127.0.0.1", None, set(), first=7071, step=2)
    assert got["front_port"] % 2 == 1 and got["front_port"] >= 7071
