"""dslaunch's hostfiles and filters against DeepSpeed's launcher, with DeepSpeed's own functions as
the oracle: its unit tests (tests/unit/launcher/test_run.py) ported, then a differential run on
generated hostfiles and filters. Every difference is one the README lists as deliberate."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dslaunch.errors import HostfileError
from dslaunch.launch.hostfile import (
    Node,
    implicit_localhost,
    local_gpus,
    parse_hostfile_text,
    select_nodes,
)

runner = pytest.importorskip("deepspeed.launcher.runner")


def ds_select(pool: dict[str, int], include: str = "", exclude: str = "") -> dict[str, list[int]] | Exception:
    """DeepSpeed's answer: host -> slots, or the exception it raised."""
    try:
        return dict(runner.parse_inclusion_exclusion(collections.OrderedDict(pool), include, exclude))
    except Exception as e:  # DeepSpeed raises ValueError, and IndexError/KeyError on some inputs
        return e


def our_select(pool: dict[str, int], include: str = "", exclude: str = "") -> dict[str, list[int]] | HostfileError:
    nodes = [Node(h, s, line=i + 1) for i, (h, s) in enumerate(pool.items())]
    try:
        got = select_nodes(nodes, include or None, exclude or None)
    except HostfileError as e:
        return e
    return {n.host: list(n.slot_ids) for n in got}


# -- DeepSpeed's tests/unit/launcher/test_run.py, on dslaunch ---------------------------------------

ONE = {"worker-0": 4}
TWO = {"worker-0": 4, "worker-1": 4}


@pytest.mark.parametrize(
    ("pool", "include", "exclude", "want"),
    [
        (ONE, "", "", {"worker-0": [0, 1, 2, 3]}),
        (ONE, "", "worker-0:1", {"worker-0": [0, 2, 3]}),
        (ONE, "", "worker-0:1,2", {"worker-0": [0, 3]}),
        (ONE, "worker-0:1", "", {"worker-0": [1]}),
        (ONE, "worker-0:1,1", "", {"worker-0": [1]}),
        (ONE, "worker-0:1@worker-0:0,1", "", {"worker-0": [0, 1]}),
        (TWO, "", "", {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]}),
        (TWO, "worker-1:0,3", "", {"worker-1": [0, 3]}),
        (TWO, "", "worker-1", {"worker-0": [0, 1, 2, 3]}),
        (TWO, "", "worker-0:0,1@worker-1:3", {"worker-0": [2, 3], "worker-1": [0, 1, 2]}),
    ],
)
def test_deepspeed_parser_cases(pool: dict[str, int], include: str, exclude: str, want: dict[str, list[int]]) -> None:
    assert ds_select(pool, include, exclude) == want
    assert our_select(pool, include, exclude) == want


@pytest.mark.parametrize(
    ("pool", "include", "exclude"),
    [
        (ONE, "", "worker-0:4"),  # a slot that does not exist
        (ONE, "", "worker-0:-1"),
        (ONE, "worker-0:4", ""),
        (ONE, "worker-0:-1", ""),
        (TWO, "jeff", ""),  # a host that does not exist
        (TWO, "", "jeff"),
        (TWO, "worker-1:4", ""),
        (TWO, "", "worker-1:4"),
        (TWO, "", "worker-1@:3"),  # formatting
        (TWO, "worker-0", "worker-1"),  # include and exclude together
    ],
)
def test_deepspeed_parser_errors(pool: dict[str, int], include: str, exclude: str) -> None:
    assert isinstance(ds_select(pool, include, exclude), Exception)
    err = our_select(pool, include, exclude)
    assert isinstance(err, HostfileError) and "\n" not in err.message


def test_deepspeed_exclude_all_is_a_clear_error_here() -> None:
    """DeepSpeed returns nothing (and later fails on an empty list); dslaunch says why at once."""
    assert ds_select(ONE, "", "worker-0") == {}
    assert our_select(ONE, "", "worker-0").message == "the host filters leave no node to run on"  # type: ignore[union-attr]


GOOD = """
worker-1 slots=2
worker-2 slots=2

localhost slots=1
123.23.12.10 slots=2

#worker-1 slots=3
# this is a comment

"""


def test_deepspeed_good_hostfile() -> None:
    want = runner._parse_hostfile(GOOD.splitlines())
    assert {n.host: n.slots for n in parse_hostfile_text(GOOD)} == dict(want) == {
        "worker-1": 2, "worker-2": 2, "localhost": 1, "123.23.12.10": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "worker-1 slots=2\nworker-2 slots=1\nworker-1 slots=1\n",  # duplicate host
        "this is bad slots=1\n",  # incorrect whitespace
        "\n",  # empty
        "worker-1 slots=2\nthis is bad slots=1\nworker-2 slots=4\nmissingslots\n",  # good and bad
    ],
)
def test_deepspeed_bad_hostfiles(text: str) -> None:
    with pytest.raises(ValueError):
        runner._parse_hostfile(text.splitlines())
    with pytest.raises(HostfileError):
        parse_hostfile_text(text)


def test_missing_slots_means_one_here() -> None:
    """Deliberate: DeepSpeed refuses a line without slots=; dslaunch reads it as one slot."""
    with pytest.raises(ValueError):
        runner._parse_hostfile(["missingslots"])
    assert [(n.host, n.slots) for n in parse_hostfile_text("missingslots\n")] == [("missingslots", 1)]


def test_max_slots_is_accepted_and_ignored() -> None:
    text = "w0 slots=4 max_slots=8\nw1 slots=2 max_slots=2 # comment\n"
    assert dict(runner._parse_hostfile(text.splitlines())) == {"w0": 4, "w1": 2}
    assert [(n.host, n.slots) for n in parse_hostfile_text(text)] == [("w0", 4), ("w1", 2)]
    with pytest.raises(HostfileError, match="max_slots='x' is not a whole number"):
        parse_hostfile_text("w0 slots=1 max_slots=x\n")


# -- the cases: a host named whole and with slots ----------------------------------------


@pytest.mark.parametrize("flag", ["include", "exclude"])
@pytest.mark.parametrize("spec", ["w0:0@w0", "w0@w0:0"])
def test_host_named_whole_and_with_slots_is_refused_not_silently_different(flag: str, spec: str) -> None:
    pool = {"w0": 4, "w1": 2}
    ds = ds_select(pool, **{flag: spec})
    assert ds == ({"w0": [0]} if flag == "include" else {"w0": [1, 2, 3], "w1": [0, 1]})
    err = our_select(pool, **{flag: spec})
    assert isinstance(err, HostfileError)
    assert "named both whole and with slots 0 (DeepSpeed would take only slots 0)" in err.message


# -- differential: generated hostfiles and filters -----------------------------------------------

HOSTS = ["w0", "w1", "w2", "w3"]


@st.composite
def pools(draw: Any) -> dict[str, int]:
    hosts = draw(st.lists(st.sampled_from(HOSTS), min_size=1, max_size=4, unique=True))
    return {h: draw(st.integers(1, 4)) for h in hosts}


entry = st.one_of(
    st.sampled_from([*HOSTS, "zz", ""]),
    st.builds(
        lambda h, ids: f"{h}:{','.join(ids)}",
        st.sampled_from([*HOSTS, "zz"]),
        st.lists(st.sampled_from(["0", "1", "2", "3", "4", "", "x", "01"]), min_size=1, max_size=3),
    ),
)
filters = st.lists(entry, min_size=1, max_size=4).map("@".join)


def _mixed(spec: str) -> bool:
    """A host named both whole and with slots: refused here on purpose."""
    whole = {p for p in spec.split("@") if ":" not in p}
    return any(p.split(":")[0] in whole for p in spec.split("@") if ":" in p)


@settings(max_examples=300, deadline=None)
@given(pools(), filters, st.sampled_from(["include", "exclude"]))
def test_filters_agree_with_deepspeed(pool: dict[str, int], spec: str, flag: str) -> None:
    ds = ds_select(pool, **{flag: spec})
    ours = our_select(pool, **{flag: spec})
    if isinstance(ours, HostfileError):
        # refused here: DeepSpeed refused too, or left nothing to run on, or the form is ambiguous
        assert isinstance(ds, Exception) or ds == {} or _mixed(spec), (ds, ours.message)
        return
    assert ours == ds


@settings(max_examples=100, deadline=None)
@given(pools(), st.integers(1, 4), st.integers(1, 4))
def test_num_nodes_and_gpus_agree_with_deepspeed(pool: dict[str, int], num_nodes: int, num_gpus: int) -> None:
    ds = dict(runner.apply_num_nodes_and_gpus(collections.OrderedDict(
        (h, list(range(s))) for h, s in pool.items()), num_nodes, num_gpus))  # fmt: skip
    nodes = [Node(h, s, line=i + 1) for i, (h, s) in enumerate(pool.items())]
    try:
        ours = {n.host: list(n.slot_ids) for n in select_nodes(nodes, num_nodes=num_nodes, num_gpus=num_gpus)}
    except HostfileError as e:
        # deliberate: DeepSpeed silently takes fewer nodes, or GPUs a host does not have
        assert num_nodes > len(pool) or any(s < num_gpus for s in list(pool.values())[:num_nodes]), e.message
        return
    assert ours == ds


# -- no hostfile: localhost, one slot per GPU ------------------------------------------------------


def test_no_hostfile_one_slot_per_gpu_and_visible_devices_pick_them() -> None:
    node, inc, note = implicit_localhost(4)
    assert (node.slots, inc, note) == (4, None, None)
    assert [n.slot_ids for n in select_nodes([node], inc, num_gpus=2)] == [(0, 1)]
    assert [n.slot_ids for n in select_nodes([node], "localhost:0,1")] == [(0, 1)]
    node, inc, note = implicit_localhost(4, visible="1,3")
    assert inc == "localhost:1,3" and [n.slot_ids for n in select_nodes([node], inc)] == [(1, 3)]
    node, inc, note = implicit_localhost(4, visible="1,3", num_gpus=2)
    assert inc is None and note and "CUDA_VISIBLE_DEVICES=1,3 is ignored" in note
    with pytest.raises(HostfileError, match="there is no GPU 7 here"):
        implicit_localhost(4, visible="7")
    with pytest.raises(HostfileError, match="only GPU numbers are understood"):
        implicit_localhost(4, visible="GPU-1234")


def test_no_hostfile_without_gpus_runs_as_many_cpu_ranks_as_asked() -> None:
    assert implicit_localhost(0)[0].slots == 1
    assert implicit_localhost(0, num_gpus=2)[0].slots == 2
    node, inc, _ = implicit_localhost(0, include="localhost:0,1")
    assert [n.slot_ids for n in select_nodes([node], inc)] == [(0, 1)]


def test_local_gpus_counts_device_files(tmp_path: Any) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert local_gpus(tmp_path) == 2
