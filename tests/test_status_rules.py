"""How `up` and `status` judge a job from what the nodes report: pure rules, tested directly.

The end-to-end fault tests exercise the same rules on live jobs; these pin each rule down.
"""

from __future__ import annotations

from typing import Any

from dslaunch.launch.ready import node_summary
from dslaunch.launch.status import NodeStatus, RankStatus, classify, describe_exit, last_failure
from dslaunch.wire.records import JobRecord, NodeRecord
from dslaunch.wire.states import JobState, NodeStage, RankStage, ranks_ready


def _rec() -> JobRecord:
    nodes = [NodeRecord(0, "n0", "n0", 2, 0, "/w/j/node0"), NodeRecord(1, "n1", "n1", 2, 2, "/w/j/node1")]
    return JobRecord("j", "r", "j-r", JobState.READY, 4, "tcp", "gloo", "/py", "10.0.0.1", 1, 2, nodes)


def _ranks(stage: str = "ready", alive: bool = True, restarts: int = 0) -> list[RankStatus]:
    return [RankStatus(r, f"n{r // 2}", r // 2, r % 2, pid=100 + r, stage=stage, restarts=restarts, alive=alive)
            for r in range(4)]  # fmt: skip


def _nodes(**kw: Any) -> list[NodeStatus]:
    return [NodeStatus(i, f"n{i}", **{"reachable": True, "agent_alive": True, **kw}) for i in range(2)]


def test_ready_needs_every_rank_alive_ready_and_in_one_attempt() -> None:
    assert ranks_ready([(True, "ready", 1), (True, "ready", 1)], 2)
    assert not ranks_ready([(True, "ready", 1)], 2), "a rank missing"
    assert not ranks_ready([(True, "ready", 1), (False, "ready", 1)], 2), "a dead rank"
    assert not ranks_ready([(True, "ready", 0), (True, "ready", 1)], 2), "mid gang restart"
    assert not ranks_ready([(True, "ready", 0), (True, "loading", 0)], 2)


def test_classify_each_job_state() -> None:
    assert classify(_nodes(), _ranks()) == (JobState.READY, "4 ranks ready")
    state, why = classify(_nodes(), [*_ranks()[:3], RankStatus(3, "n1", 1, 1, stage="loading", alive=True)])
    assert state is JobState.STARTING and why == "3/4 ranks ready"
    failed = _ranks()
    failed[2].stage, failed[2].error = RankStage.FAILED, "boom"
    assert classify(_nodes(), failed) == (JobState.STARTING, "restarting after rank 2 failed: boom")
    one_dead = [_nodes()[0], NodeStatus(1, "n1", True, agent_alive=False, exit_code=1)]
    assert classify(one_dead, _ranks()) == (JobState.DEGRADED, "agent not running on n1")
    all_dead = [NodeStatus(i, f"n{i}", True, agent_alive=False, exit_code=1) for i in range(2)]
    assert classify(all_dead, _ranks(alive=False))[0] is JobState.FAILED
    stale = [NodeStatus(i, f"n{i}", True, agent_alive=False) for i in range(2)]
    assert classify(stale, _ranks(alive=False))[0] is JobState.GONE
    cut = [_nodes()[0], NodeStatus(1, "n1", reachable=False)]
    assert classify(cut, _ranks()) == (JobState.DEGRADED, "unreachable: n1")
    cut_and_dead = [NodeStatus(0, "n0", True, agent_alive=False, exit_code=1), NodeStatus(1, "n1", reachable=False)]
    assert classify(cut_and_dead, _ranks())[0] is JobState.FAILED


def test_the_first_failure_of_the_latest_attempt_is_the_cause() -> None:
    """Peers that lost the failed rank fail a little later: effects, not the cause."""
    early = {"when": "11-24 10:00:00", "exit_code": -9, "local_rank": 1, "pid": 11, "rank": 1, "attempt": 1}
    effect = {"when": "11-24 10:00:03", "exit_code": 1, "local_rank": 0, "pid": 20, "rank": 2, "attempt": 1}
    older = {"when": "11-24 09:00:00", "exit_code": 1, "local_rank": 0, "pid": 5, "rank": 0, "attempt": 0}
    nodes = [NodeStatus(0, "n0", True, failures=[older, early]), NodeStatus(1, "n1", True, failures=[effect])]
    got = last_failure(_rec(), nodes)
    assert (got["rank"], got["host"], got["cause"]) == (1, "n0", "killed by SIGKILL")
    unnumbered = {"when": "11-24 10:00:00", "exit_code": 3, "local_rank": 1, "pid": 30}
    got = last_failure(_rec(), [_nodes()[0], NodeStatus(1, "n1", True, failures=[unnumbered])])
    assert got["rank"] == 3, "rank from the node's offset and the local rank" and got["cause"] == "exited with code 3"
    assert last_failure(_rec(), _nodes()) == {}
    assert describe_exit(-15) == "killed by SIGTERM" and describe_exit(-99) == "killed by signal 99"


def _rank(stage: str, alive: bool = True, restarts: int = 0) -> dict[str, Any]:
    return {"stage": stage, "alive": alive, "restarts": restarts}


def test_node_summary_as_up_shows_it() -> None:
    alive = {"alive": True}
    assert node_summary(2, {"agent": {"alive": False, "exit_code": 1}}) == (NodeStage.FAILED, "agent exited (code 1)")
    assert node_summary(2, {"agent": {"alive": False}})[1] == "agent exited (killed)"
    assert node_summary(2, {"agent": alive, "ranks": []}) == (NodeStage.STARTED, "0/2 ranks up")
    starting = {"agent": alive, "ranks": [_rank("starting"), _rank("rendezvous")]}
    assert node_summary(2, starting) == (NodeStage.RENDEZVOUS, "0/2 ranks ready")
    ready = {"agent": alive, "ranks": [_rank("ready", restarts=1), _rank("ready", restarts=1)]}
    assert node_summary(2, ready) == (NodeStage.READY, "2/2 ranks, restart 1")
    mixed = {"agent": alive, "ranks": [_rank("ready", restarts=0), _rank("ready", restarts=1)]}
    assert node_summary(2, mixed)[0] is NodeStage.RENDEZVOUS, "ranks of two attempts are not ready"
    loading = [{**_rank("loading"), "load": {"read": 600 * 10**6, "total": 2 * 10**9, "rate": 150 * 10**6}},
               {**_rank("loading"), "load": {"read": 1.4e9, "total": 2e9, "rate": 350 * 10**6}}]  # fmt: skip
    got = node_summary(2, {"agent": alive, "ranks": loading})
    assert got == (NodeStage.RENDEZVOUS, "0/2 ranks ready, loading 50% of 4.0 GB (by rank: 30% 70%), 500.0 MB/s"), got


def test_replicas_are_judged_each_as_its_own_gang_and_the_router_alone_keeps_nothing_alive() -> None:
    ranks = _ranks()
    for r in ranks:
        r.replica = r.rank // 2
    ranks[2].restarts = ranks[3].restarts = 1  # replica 1 restarted once: its own attempt, not replica 0's
    router = NodeStatus(2, "n0", True, agent_alive=True, kind="router")
    assert classify([*_nodes(), router], ranks) == (JobState.READY, "4 ranks ready in 2 replicas")
    ranks[3].stage, ranks[3].error = RankStage.FAILED, "killed"
    state, why = classify([*_nodes(), router], ranks)
    assert state is JobState.DEGRADED and why.startswith("replica 1 not serving after rank 3 failed: killed")
    assert why.endswith("1/2 replicas serve")
    agents_gone = [NodeStatus(i, f"n{i}", True, agent_alive=False, exit_code=1) for i in range(2)]
    assert classify([*agents_gone, router], _ranks(alive=False))[0] is JobState.FAILED
    router_gone = NodeStatus(2, "n0", True, agent_alive=False, kind="router")
    assert classify([*_nodes(), router_gone], _ranks()) == (JobState.DEGRADED, "router not running on n0")


def test_the_routers_view_of_a_replica_moves_only_as_its_table_says() -> None:
    import pytest

    from dslaunch.serving.replicaview import Replica
    from dslaunch.wire.states import LINK_MOVES, FrontState, LinkState, front_state

    assert set(LINK_MOVES) == set(LinkState), "every state has its moves"
    assert all(LinkState.CONNECTING not in to for to in LINK_MOVES.values()), "connecting is only the start"
    rep = Replica(0)
    for state in (LinkState.READY, LinkState.DRAINING, LinkState.DOWN, LinkState.READY, LinkState.DOWN):
        rep.set(state)
        assert rep.row()["state"] == state.value
    with pytest.raises(ValueError, match="no move from down to connecting"):
        rep.set(LinkState.CONNECTING)
    with pytest.raises(ValueError):
        Replica(1).set(LinkState.DOWN)  # a replica that never linked cannot go down
    assert front_state(True, ["draining", "ready"]) is FrontState.READY
    assert front_state(True, ["draining", "down", "connecting"]) is FrontState.STARTING
    assert front_state(False, ["ready"]) is FrontState.STOPPING


def test_the_gang_restart_rule() -> None:
    from dslaunch.wire.restarts import ATTEMPT_FIELD, attempt_url, backoff_delay, hang_limit

    assert [backoff_delay(1.0, a) for a in range(5)] == [0, 0, 1, 2, 4], "the first restart is immediate"
    assert hang_limit(120, 0, 4) == 120 and hang_limit(120, 3, 4) == 240 and hang_limit(120, 0, 1) == 0
    assert attempt_url(f"file:///r/j-{ATTEMPT_FIELD}", 3) == "file:///r/j-3"
    assert attempt_url("tcp://h:1", 3) == "tcp://h:1"
