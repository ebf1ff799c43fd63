"""The job record: what `status`, `logs`, `query` and `down` need to find a job again.

Written by `up` on the launch host (see launch/store for where and how); plain data, typed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dslaunch.wire.hosts import Node
from dslaunch.wire.states import JobState


@dataclass
class NodeRecord:
    node_rank: int
    host: str
    target: str  # user@host as given in the hostfile, or the host
    nprocs: int
    rank_offset: int
    node_dir: str
    address: str | None = None  # how the other nodes reach this one
    agent_pid: int | None = None
    # An entry is one agent (a unit: one replica's ranks on one node) or the router; node_rank is
    # its index in the record (its marker), rank_offset its first job-wide rank, gang_offset that
    # rank inside its replica.
    replica: int = 0
    gang_offset: int = 0
    kind: str = "agent"  # agent | router

    def node(self) -> Node:
        """The recorded node as a hostfile node again (a user@host target split back)."""
        user, _, host = self.target.rpartition("@")
        return Node(host=host, slots=self.nprocs, user=user or None)


@dataclass
class FrontRecord:
    """Where the front listens and what it serves; the token lives only here (0600) and on node 0."""

    bind: str
    port: int
    loopback: bool
    task: str  # generate | embed | custom
    model: str
    token: str | None = field(default=None, repr=False)
    # the front proves it knows this before a client sends it the token (a squatter on the port cannot)
    nonce: str | None = field(default=None, repr=False)
    # the key the router and the replica leaders prove to each other on their link
    link_key: str | None = field(default=None, repr=False)
    # every router's public port, router K (on the record's K-th router entry) at ports[K]; records
    # from before standby routers have one router, on `port`
    ports: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def router_ports(self) -> list[int]:
        return list(self.ports) or [self.port]


@dataclass
class JobRecord:
    name: str
    run_id: str
    job_id: str
    state: JobState  # starting | ready | failed | stopping (as last written; `status` judges live)
    world_size: int
    init_method: str
    backend: str
    python: str
    master_addr: str
    master_port: int
    rdzv_port: int
    nodes: list[NodeRecord]
    rdzv_glob: str | None = None
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    accept_new_host_keys: bool = False
    keep_logs: bool = False
    created: float = 0.0
    front: FrontRecord | None = None
    tp: int = 0  # ranks per replica (0 in records from before replicas: every rank)
    replicas: int = 1
    launcher: str = "ssh"  # how the job's processes reach the nodes (records from before launchers: ssh)
    launcher_meta: dict[str, str] = field(default_factory=dict)  # the launcher's own ids (a Slurm job)

    @property
    def agents(self) -> list[NodeRecord]:
        return [n for n in self.nodes if n.kind == "agent"]

    @property
    def router(self) -> NodeRecord | None:
        return next((n for n in self.nodes if n.kind == "router"), None)

    @property
    def routers(self) -> list[NodeRecord]:
        """Every router entry, router K at K (on the K-th node of the hostfile)."""
        return [n for n in self.nodes if n.kind == "router"]

    def router_index(self, k: int = 0) -> int:
        """Router K's index in `nodes` (its marker)."""
        return [i for i, n in enumerate(self.nodes) if n.kind == "router"][k]

    def replica_units(self, replica: int) -> list[NodeRecord]:
        return [n for n in self.agents if n.replica == replica]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = JobState(self.state).value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        d = dict(d)
        d["nodes"] = [NodeRecord(**n) for n in d["nodes"]]
        front = d.pop("front", None) or (d.pop("extra", None) or {}).get("front")
        d.pop("extra", None)
        d["front"] = FrontRecord(**front) if front else None
        d["state"] = JobState(d["state"])
        return cls(**d)

    def node_list(self) -> list[Node]:
        return [n.node() for n in self.nodes]
