"""Rendering never interprets text from the nodes as rich markup (gloo errors look like tags)."""

from __future__ import annotations

from rich.console import Console

from dslaunch.cli import render
from dslaunch.launch.status import JobStatus, NodeStatus, RankStatus


def test_errors_with_brackets_are_printed_verbatim() -> None:
    gloo = "RuntimeError: [/__w/pytorch/third_party/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1"
    st = JobStatus(
        name="j", state="failed", world_size=1, init_method="tcp", backend="gloo", run_id="r",
        master="127.0.0.1:1", created=0.0, reason="every agent has ended",
        nodes=[NodeStatus(0, "node0", True, error="[bold]not markup[/bold]")],
        ranks=[RankStatus(0, "node0", 0, 0, stage="failed", error=gloo)],
        front={"address": "127.0.0.1:7070", "ready": False, "task": "generate", "model": "[m]"},
    )  # fmt: skip
    console = Console(width=400, record=True)
    console.print(render.status_view(st))
    text = console.export_text()
    assert gloo in text and "[bold]not markup[/bold]" in text and "[m]" in text


def test_every_state_dslaunch_reports_has_a_style() -> None:
    """A stage the worker or `up` produces and the renderer does not know would show unstyled."""
    from dslaunch.wire.states import JobState, NodeStage, RankStage

    assert {s.value for s in (*RankStage, *NodeStage)} <= set(render.STAGE_STYLE)
    assert {s.value for s in JobState} == set(render.STATE_STYLE)
    assert not set(render.STAGE_STYLE) - {s.value for s in (*RankStage, *NodeStage)}, "a style for no stage"


def test_a_loading_rank_shows_how_far_its_shard_has_come() -> None:
    load = {"read": 3 * 10**9, "total": 12 * 10**9, "rate": 250 * 10**6}
    st = JobStatus(
        name="j", state="starting", world_size=2, init_method="tcp", backend="nccl", run_id="r",
        master="10.0.0.1:1", created=0.0, reason="loading",
        nodes=[NodeStatus(0, "node0", True)],
        ranks=[RankStatus(0, "node0", 0, 0, stage="loading", alive=True, load=load),
               RankStatus(1, "node0", 0, 1, stage="rendezvous", alive=True)],
    )  # fmt: skip
    console = Console(width=400, record=True)
    console.print(render.status_view(st))
    assert "loading 25% of 12.0 GB, 250.0 MB/s" in console.export_text()
    assert st.to_json()["ranks"][0]["load"] == load, "--json carries it too"
