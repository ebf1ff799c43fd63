"""Every state dslaunch reports, as string enums, with their transitions; and the one "ready" rule.

Standard library only: the worker writes rank stages, nodectl and the launch host read them.
The values are what `status --json` shows, so they are part of the interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class _Values(str, Enum):
    """A str enum that prints and formats as its value (as `StrEnum` does on Python 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return str(self.value).__format__(spec)


class RankStage(_Values):
    """A rank's stage, written by the worker to `ranks/rank<R>.json` on every change.

    starting → [backoff →] rendezvous → loading → ready → (stopping → stopped | lost_peer | failed).
    A failed or restarted attempt starts again at `starting` (a new process). `pending` and
    `exited` are never written: `status` derives them (no status file yet; the process is gone).
    """

    STARTING = "starting"
    BACKOFF = "backoff"  # waiting --restart-backoff seconds before a repeated restart
    RENDEZVOUS = "rendezvous"  # forming the process group
    LOADING = "loading"  # the group works; loading the model
    READY = "ready"  # serving
    LOST_PEER = "lost_peer"  # a collective failed because another rank went away; awaiting the restart
    STOPPING = "stopping"  # SIGTERM received: finishing the running batch
    STOPPED = "stopped"
    FAILED = "failed"  # this rank's own error (status shows it), or hung
    PENDING = "pending"  # derived: no status file yet
    EXITED = "exited"  # derived: the process is gone without saying why


class NodeStage(_Values):
    """One node as `up` shows it live: waiting → connecting → checked → started → rendezvous → ready.

    `failed` ends `up` (pre-flight refused the node, its agent could not start or stopped).
    """

    WAITING = "waiting"
    CONNECTING = "connecting"
    CHECKED = "checked"
    STARTED = "started"
    RENDEZVOUS = "rendezvous"
    READY = "ready"
    FAILED = "failed"


class JobState(_Values):
    """The whole job, as `status` judges it from every node.

    starting ⇄ ready (a gang restart goes back to starting); any → degraded (a node unreachable
    or an agent gone while others run); any → failed (every agent ended with an error);
    any → gone (no process left: a stale record). The record itself also says `stopping`
    while `down` runs.
    """

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"
    GONE = "gone"
    STOPPING = "stopping"
    SUBMITTED = "submitted"  # no record yet: Slurm has not run the job `up` submitted (status says why)


class ReplicaState(_Values):
    """One replica as `status` judges it from its ranks (every replica is its own gang).

    starting → ready (`ranks_ready` holds for its ranks); ready → restarting (a rank failed: its
    gang restarts) → starting → ready.
    """

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"


class LinkState(_Values):
    """One replica as the router sees it: its link (`serving/replicaview.Replica.set` checks moves).

    connecting → ready | draining (its leader linked; draining when `restart` drains it);
    ready ⇄ draining (the drain file); ready | draining → down (the link closed or went silent,
    or its leader said it is stopping); down → ready | draining (its leader linked again).
    """

    CONNECTING = "connecting"  # never linked since the router started
    READY = "ready"  # linked: gets new work
    DRAINING = "draining"  # linked: finishes what it has, gets nothing new
    DOWN = "down"  # was linked, is not now


LINK_MOVES: dict[LinkState, frozenset[LinkState]] = {
    LinkState.CONNECTING: frozenset({LinkState.READY, LinkState.DRAINING}),
    LinkState.READY: frozenset({LinkState.DRAINING, LinkState.DOWN}),
    LinkState.DRAINING: frozenset({LinkState.READY, LinkState.DOWN}),
    LinkState.DOWN: frozenset({LinkState.READY, LinkState.DRAINING}),
}
LINKED = frozenset({LinkState.READY, LinkState.DRAINING})  # a link is up
DRAINED = frozenset({LinkState.DRAINING, LinkState.DOWN})  # `restart` may stop it (once nothing is in flight)


class FrontState(_Values):
    """A front's `health` status. The router's: starting ⇄ ready (some replica's link is READY);
    any → stopping (SIGTERM: it answers what is queued and takes nothing new). A replica leader's
    (or a one-replica job's rank 0): ready → stopping."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class RouterState(_Values):
    """One router as `status` judges it from its node: starting ⇄ ready (its front serves, its
    status file fresh); any → down (its supervisor is not running); any → unreachable (its node
    does not answer). A job whose routers are not all ready is degraded while one still serves."""

    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    UNREACHABLE = "unreachable"


def front_state(accepting: bool, links: Iterable[str]) -> FrontState:
    """The one rule for the router's status, from whether it accepts work and its links' states."""
    if not accepting:
        return FrontState.STOPPING
    return FrontState.READY if any(s == LinkState.READY for s in links) else FrontState.STARTING


# Stages of a rank whose process group exists (up shows its node as past `started`).
GROUP_FORMED = frozenset({RankStage.RENDEZVOUS, RankStage.LOADING, RankStage.READY})


def ranks_ready(ranks: Iterable[tuple[bool, str, int]], want: int) -> bool:
    """The one rule for "ready", used by `up` and `status` alike.

    `ranks` are (alive, stage, attempt) triples: all `want` ranks alive, ready, and in the same
    job-wide attempt (right after a gang restart, a rank of the old attempt may still say ready).
    """
    rows = list(ranks)
    return (
        len(rows) == want
        and all(alive and stage == RankStage.READY for alive, stage, _ in rows)
        and len({attempt for *_, attempt in rows}) <= 1
    )
