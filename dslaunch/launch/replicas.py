"""Where each replica's ranks run: pure placement, no I/O.

Ranks are numbered in hostfile order (node 0 holds ranks 0..S-1, then node 1, ...), and replica r
is ranks r*tp .. (r+1)*tp-1. So replicas fill the nodes one after the other, and a replica stays
inside one node whenever `--tp` is at most that node's slots. Each replica is its own torchrun
gang; the part of a replica on one node is a *unit*: one agent with its own directory and marker.
A node holding two replicas runs two agents.
"""

from __future__ import annotations

from dataclasses import dataclass

from dslaunch.wire.hosts import Node


@dataclass(frozen=True)
class Unit:
    """One agent: the ranks of one replica on one node."""

    unit: int  # the job's agent index: its marker and its node directory
    replica: int
    node: int  # the node's index in the hostfile
    gang_node: int  # the agent's node rank inside its replica (torchrun --node-rank)
    slot_ids: tuple[int, ...]
    rank_offset: int  # the job-wide rank of its first rank (hostfile order)
    gang_offset: int  # that rank inside its replica

    @property
    def nprocs(self) -> int:
        return len(self.slot_ids)


@dataclass(frozen=True)
class Replica:
    replica: int
    units: tuple[Unit, ...]

    @property
    def head(self) -> int:
        """The node of the replica's rank 0: it hosts the replica's rendezvous and master port."""
        return self.units[0].node

    @property
    def first_rank(self) -> int:
        return self.units[0].rank_offset


def place(nodes: list[Node], tp: int) -> list[Replica]:
    """Split the hostfile's ranks into replicas of `tp` ranks, in hostfile order (tp divides them)."""
    units: list[Unit] = []
    rank = 0
    for i, node in enumerate(nodes):
        slots = list(node.slot_ids)
        while slots:
            replica, gang_offset = divmod(rank, tp)
            take = slots[: tp - gang_offset]
            slots = slots[len(take) :]
            gang_node = sum(1 for u in units if u.replica == replica)
            units.append(Unit(len(units), replica, i, gang_node, tuple(take), rank, gang_offset))
            rank += len(take)
    replicas = rank // tp if tp else 0
    return [Replica(r, tuple(u for u in units if u.replica == r)) for r in range(replicas)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def heads_per_node(replicas: list[Replica], n_nodes: int) -> list[int]:
    """How many replicas each node hosts the rendezvous of (each needs two free ports there)."""
    counts = [0] * n_nodes
    for r in replicas:
        counts[r.head] += 1
    return counts
