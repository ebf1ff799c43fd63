"""Parallel fan-out over nodes: a result or an error for every host, never stopping half-way."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dslaunch.errors import RemoteError
from dslaunch.wire.hosts import Node

T = TypeVar("T")


@dataclass
class HostResult(Generic[T]):
    node: Node
    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """The failure as one line that starts with the host."""
        line = str(self.error)
        return line if line.startswith(self.node.host) else f"{self.node.host}: {line}"


class HostResults(list[HostResult[T]]):
    """One result per host, in the order asked; `raise_failures` turns failures into one error."""

    @property
    def failed(self) -> list[HostResult[T]]:
        return [r for r in self if not r.ok]

    def raise_failures(self, what: str) -> None:
        """Raise one RemoteError naming every failed host (one line each), if any failed."""
        bad = self.failed
        if bad:
            lines = "\n  ".join(r.describe() for r in bad)
            raise RemoteError(f"{what} failed on {len(bad)} of {len(self)} node(s):\n  {lines}")


def fan_out(items: list[Any], fn: Callable[[Any], T], parallelism: int = 32) -> HostResults[T]:
    """Call `fn(item)` for every item (each has `.node`) in parallel; one result per item, in order.

    A Ctrl-C in the caller still waits for calls under way, so the caller knows exactly what was
    done on every host before it cleans up.
    """
    results: HostResults[T] = HostResults(HostResult(item.node) for item in items)
    if not items:
        return results

    def one(i: int) -> None:
        try:
            results[i].value = fn(items[i])
        except Exception as e:
            results[i].error = e

    pool = ThreadPoolExecutor(max_workers=min(parallelism, len(items)), thread_name_prefix="fanout")
    futures = [pool.submit(one, i) for i in range(len(items))]
    try:
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True)
    return results
