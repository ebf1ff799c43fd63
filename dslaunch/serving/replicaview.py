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

from dslaunch.engine.logprobs import doc_tail
from dslaunch.serving.batcher import Pending
from dslaunch.wire.protocol import Request
from dslaunch.wire.states import LINK_MOVES, LinkState

CONNECTING, READY, DRAINING, DOWN = LinkState.CONNECTING, LinkState.READY, LinkState.DRAINING, LinkState.DOWN
LOAD_FRESH_S = 12.0  # a replica's load report counts this long (pinged every 5 s: two pings' worth)


@dataclass
class Job:
    """One client request in the router: where it runs, and the stream text its client already has."""

    pending: Pending
    deadline: float
    sent: dict[int, str] = field(default_factory=dict)  # per row: text already given to the client
    got: dict[int, str] = field(default_factory=dict)  # per row: text of the current run
    lps_sent: dict[int, int] = field(default_factory=dict)  # per row: tokens whose logprobs the client has
    lps_got: dict[int, int] = field(default_factory=dict)  # per row: tokens with logprobs in the current run
    prompt_sent: set[int] = field(default_factory=set)  # rows whose scored prompt the client has

    @property
    def live(self) -> bool:
        return not (self.pending.cancelled or self.pending.answered)

    def new_logprobs(self, index: int, lps: dict[str, Any] | None) -> dict[str, Any] | None:
        """Of a chunk's logprobs, what the client has not had: the tokens past those it has (a
        re-run gives the same tokens again), and the scored prompt once."""
        new: dict[str, Any] | None = None
        if isinstance(lps, dict) and isinstance(lps.get("tokens"), list):
            before = self.lps_got.get(index, 0)
            now = self.lps_got[index] = before + len(lps["tokens"])
            have = self.lps_sent.get(index, 0)
            if now > have:
                new = doc_tail(lps, max(0, have - before))
                self.lps_sent[index] = now
        if isinstance(lps, dict) and "prompt" in lps and index not in self.prompt_sent:
            self.prompt_sent.add(index)
            new = {**(new or {}), "prompt": lps["prompt"]}
        return new


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
    others: int = 0  # rows the replica last said it has from the job's other routers
    heard_load: float = 0.0  # when (monotonic)

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "attempt": self.attempt, "ranks": self.ranks,
                "in_flight": self.outstanding, "others": self.others_now(), "served": self.served,
                "errors": self.errors, "since": round(self.since, 3)}  # fmt: skip

    def note_load(self, load: Any) -> None:
        """The replica's own count of its rows, over the links of every router: ours are the ones we
        sent and it has not answered (the answer carrying the count among them)."""
        if isinstance(load, int) and not isinstance(load, bool) and load >= 0:
            self.others, self.heard_load = max(0, load - self.outstanding), time.monotonic()

    def others_now(self) -> int:
        """The others' share, while the report is fresh (pings bring one every few seconds)."""
        return self.others if time.monotonic() - self.heard_load < LOAD_FRESH_S else 0

    @property
    def load(self) -> int:
        """What balancing counts: our rows on it and the other routers'."""
        return self.outstanding + self.others_now()

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
