"""Fan-out over nodes: one result per host, in order, errors kept per host, never stopping half-way."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from dslaunch.errors import RemoteError
from dslaunch.transport.fanout import fan_out
from dslaunch.wire.hosts import Node


@dataclass
class Item:
    node: Node


def test_results_in_order_with_each_hosts_error_and_every_call_made() -> None:
    items = [Item(Node(f"h{i}", 1)) for i in range(6)]
    called: list[str] = []
    lock = threading.Lock()

    def fn(item: Item) -> str:
        with lock:
            called.append(item.node.host)
        time.sleep(0.05 if item.node.host == "h0" else 0)  # the first finishes last
        if item.node.host in ("h1", "h4"):
            raise RemoteError(f"{item.node.host}: refused")
        if item.node.host == "h5":
            raise OSError("no route")
        return item.node.host.upper()

    results = fan_out(items, fn, parallelism=3)
    assert sorted(called) == [f"h{i}" for i in range(6)], "a failure never stops the others"
    assert [r.node.host for r in results] == [f"h{i}" for i in range(6)]
    assert [r.value for r in results if r.ok] == ["H0", "H2", "H3"]
    assert [r.describe() for r in results.failed] == ["h1: refused", "h4: refused", "h5: no route"]
    with pytest.raises(RemoteError) as e:
        results.raise_failures("probe")
    assert e.value.message == "probe failed on 3 of 6 node(s):\n  h1: refused\n  h4: refused\n  h5: no route"


def test_calls_run_in_parallel_up_to_the_bound() -> None:
    running, peak = 0, 0
    lock = threading.Lock()

    def fn(_item: Item) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    fan_out([Item(Node(f"h{i}", 1)) for i in range(8)], fn, parallelism=4).raise_failures("x")
    assert peak == 4


def test_nothing_to_do() -> None:
    results = fan_out([], lambda _i: 1)
    assert list(results) == [] and not results.failed
    results.raise_failures("x")
