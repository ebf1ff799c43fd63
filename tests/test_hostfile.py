"""Hostfile parsing and host filters: DeepSpeed's format, and one clear line per mistake."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dslaunch.errors import HostfileError
from dslaunch.launch.hostfile import Node, load_hostfile, parse_hostfile_text, select_nodes

GOOD = """
# the cluster
worker-0 slots=4
admin@worker-1   slots=2   # trailing comment
worker-2
"""


def test_parses_deepspeed_format() -> None:
    nodes = parse_hostfile_text(GOOD, "hosts")
    assert [(n.host, n.user, n.slots, n.line) for n in nodes] == [
        ("worker-0", None, 4, 3),
        ("worker-1", "admin", 2, 4),
        ("worker-2", None, 1, 5),
    ]
    assert nodes[1].target == "admin@worker-1"
    assert nodes[0].slot_ids == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a slots=2\na slots=1\n", "hosts:2: host 'a' is listed twice (first on line 1)"),
        ("a slots=0\n", "hosts:1: slots=0 must be at least 1"),
        ("a slots=abc\n", "hosts:1: slots='abc' is not a whole number"),
        ("a slots=-1\n", "hosts:1: slots='-1' is not a whole number"),
        ("a gpus=2\n", "hosts:1: unknown key 'gpus'"),
        ("a slots=1 slots=2\n", "hosts:1: 'slots' given twice"),
        ("a 4\n", "hosts:1: unexpected '4'"),
        ("\n# only comments\n\n", "hosts: no hosts in the hostfile"),
        ("", "hosts: no hosts in the hostfile"),
        ("slots=2\n", "hosts:1: 'slots=2' is not a host name"),
        ("bad/host slots=1\n", "hosts:1: 'bad/host' is not a host name"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(HostfileError) as e:
        parse_hostfile_text(text, "hosts")
    assert e.value.message.startswith(message), e.value.message
    assert "\n" not in e.value.message


def test_missing_and_directory(tmp_path) -> None:
    with pytest.raises(HostfileError, match="hostfile not found"):
        load_hostfile(tmp_path / "nope")
    with pytest.raises(HostfileError, match="is a directory"):
        load_hostfile(tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe host")
    with pytest.raises(HostfileError, match="not UTF-8"):
        load_hostfile(tmp_path / "bin")


NODES = [Node("a", 4, line=1), Node("b", 2, line=2), Node("c", 1, line=3)]


def test_include_with_slots() -> None:
    got = select_nodes(NODES, include="a:0,2@c")
    assert [(n.host, n.slot_ids) for n in got] == [("a", (0, 2)), ("c", (0,))]
    assert not got[0].all_slots and got[1].all_slots


def test_exclude_slots_and_hosts() -> None:
    got = select_nodes(NODES, exclude="a:1@b")
    assert [(n.host, n.slot_ids) for n in got] == [("a", (0, 2, 3)), ("c", (0,))]


def test_num_nodes_and_gpus() -> None:
    got = select_nodes(NODES, num_nodes=2, num_gpus=2)
    assert [(n.host, n.slot_ids) for n in got] == [("a", (0, 1)), ("b", (0, 1))]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"include": "a", "exclude": "b"}, "--include and --exclude cannot be used together"),
        ({"include": "zz"}, "--include 'zz': host 'zz' is not in the hostfile (a, b, c)"),
        ({"include": "a:9"}, "--include 'a:9': host 'a' has slots 0..3, not 9"),
        ({"exclude": "a:x"}, "--exclude 'a:x': slot 'x' on 'a' is not a whole number"),
        ({"include": "a@"}, "--include 'a@': empty host entry"),
        ({"exclude": "a@b@c"}, "the host filters leave no node to run on"),
        ({"num_nodes": 5}, "--num-nodes 5: only 3 node(s) selected"),
        ({"num_nodes": 0}, "--num-nodes 0: must be at least 1"),
        ({"num_gpus": 3}, "--num-gpus 3: host 'b' (line 2) has only 2 slot(s)"),
    ],
)
def test_filter_errors_name_the_flag(kw: dict, message: str) -> None:
    with pytest.raises(HostfileError) as e:
        select_nodes(NODES, **kw)
    assert e.value.message == message


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_never_crashes_on_arbitrary_text(text: str) -> None:
    try:
        nodes = parse_hostfile_text(text, "fuzz")
    except HostfileError as e:
        assert e.message.startswith("fuzz")
        return
    assert nodes and all(n.slots >= 1 for n in nodes)
    assert len({n.host for n in nodes}) == len(nodes)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc:,@0123456789 ", max_size=20),
    st.sampled_from(["include", "exclude"]),
)
def test_filters_never_crash(spec: str, which: str) -> None:
    try:
        got = select_nodes(NODES, **{which: spec})
    except HostfileError as e:
        assert e.message
        return
    assert got and all(n.slot_ids for n in got)
