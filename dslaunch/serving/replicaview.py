"""The router's view of one replica: its state, its link, and the requests it has in flight.

Plain records the dispatcher (`serving.dispatch`) keeps per replica and per request, and the two
rules about a replica's answers: which requests may run again, and how an answer maps back to
the Front's ("done", results).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from dslaunch.serving.batcher import Pending
from dslaunch.wire.protocol import Request
from dslaunch.wire.states import LINK_MOVES, LinkState

CONNECTING, READY, DRAINING, DOWN = LinkState.CONNECTING, LinkState.READY, LinkState.DRAINING, LinkState.DOWN


@dataclass
class Job:
    """One client request in the router: where it runs, and the stream text its client already has."""

    pending: Pending
    deadline: float
    sent: dict[int, str] = field(default_factory=dict)  # per row: text already given to the client
    got: dict[int, str] = field(default_factory=dict)  # per row: text of the current run

    @property
    def live(self) -> bool:
        return not (self.pending.cancelled or self.pending.answered)


class Link:
    """One replica leader's connection: its requests in flight, by the router's ids."""

    def __init__(self, replica: Replica, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.replica = replica
        self.reader, self.writer = reader, writer
        self.flights: dict[int, Job] = {}
        self.heard = time.monotonic()
        self.pinged = 0.0
        self.dead = False


@dataclass
class Replica:
    id: int
    state: LinkState = CONNECTING
    attempt: int = 0
    ranks: int = 0
    cap: int = 0
    outstanding: int = 0  # rows sent and not answered
    served: int = 0
    errors: int = 0
    since: float = field(default_factory=time.time)
    draining: bool = False
    last_sent: float = 0.0
    link: Link | None = None

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "attempt": self.attempt, "ranks": self.ranks,
                "in_flight": self.outstanding, "served": self.served, "errors": self.errors,
                "since": round(self.since, 3)}  # fmt: skip

    def set(self, state: LinkState) -> None:
        """Move to `state` (staying is no move); a move LINK_MOVES does not allow is a bug here."""
        if state == self.state:
            return
        if state not in LINK_MOVES[self.state]:
            raise ValueError(f"replica {self.id}: no move from {self.state} to {state}")
        self.state, self.since = state, time.time()


def deterministic(req: Request) -> bool:
    """A re-run gives the same text: greedy or seeded generation (and every other op)."""
    return req.op != "generate" or req.params.greedy or req.params.seed is not None


def results_of(req: Request, answer: dict[str, Any]) -> list[Any]:
    """A replica's plural answer as the Front's ("done", results)."""
    if req.op == "health":
        return list(answer.get("ranks") or [])
    return list(answer["embeddings"] if req.op == "embed" else answer["results"])
