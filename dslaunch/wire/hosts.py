"""One machine of a job, as the hostfile named it: shared by the launch host and the transports."""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL_HOSTS = frozenset({"localhost"})


@dataclass(frozen=True)
class Node:
    """One machine of the job: the name as written, its slots, and which slot indices are used."""

    host: str
    slots: int
    user: str | None = None
    line: int = 0
    slot_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.slot_ids:
            object.__setattr__(self, "slot_ids", tuple(range(self.slots)))

    @property
    def target(self) -> str:
        """`user@host` when a user was given, else the host: what SSH is asked to reach."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    @property
    def where(self) -> str:
        """' (line N)' for a node read from a hostfile, '' for the implicit localhost."""
        return f" (line {self.line})" if self.line else ""

    @property
    def nprocs(self) -> int:
        return len(self.slot_ids)

    @property
    def all_slots(self) -> bool:
        """True when every slot of the machine is used (no device mask needed)."""
        return self.slot_ids == tuple(range(self.slots))
