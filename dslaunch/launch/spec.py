"""The job spec: everything `up` was asked for, built once by the CLI and validated here."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node
from dslaunch.launch.replicas import Replica, divisors, place
from dslaunch.launch.store import check_name
from dslaunch.transport.launchers import launcher_factory
from dslaunch.wire.initmethods import InitMethod, init_method
from dslaunch.wire.restarts import MAX_BACKOFF_S
from dslaunch.wire.serve import ServeSpec, positive_seconds

BACKENDS = ("auto", "nccl", "gloo")
RANK_STARTS = ("fork", "exec")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Launch-host variables forwarded to every node: DeepSpeed's launcher forwards NCCL*, PYTHON*
# (PYTHONPATH among them), MLFLOW*, MV2* and UCX*; the others are what torch and HF read.
FORWARD_PREFIXES = (
    "NCCL", "PYTHON", "MLFLOW", "MV2", "UCX", "GLOO_", "FI_", "HF_", "TRANSFORMERS_", "TORCH_",
)  # fmt: skip
DEEPSPEED_ENV_NAME = ".deepspeed_env"
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


@dataclass
class JobSpec:
    """What to run where; `__post_init__` rejects combinations that cannot work, with the flag named."""

    nodes: list[Node]
    name: str = "default"
    init_method: str = "tcp"
    rdzv_dir: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_port: int | None = None
    max_restarts: int = 3
    restart_backoff: float = 1.0
    restart_window: float = 600.0  # s of running after which a replica's restart budget is whole again
    rank_start: str = "fork"  # RANK_STARTS: fork from a warm agent (rank/torchrun.py), or exec as torchrun
    python: str = sys.executable
    work_dir: str = "~/.dslaunch/run"
    backend: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 300.0
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    pg_timeout: float = 1800.0
    stop_grace: float = 10.0
    accept_new_host_keys: bool = False
    parallelism: int = 32
    keep_logs: bool = False
    serve: ServeSpec = field(default_factory=ServeSpec)
    # where each `env` value came from (for messages), and the keys whose `$VAR`s the node expands
    env_sources: dict[str, str] = field(default_factory=dict)
    expand_env: tuple[str, ...] = ()
    # DeepSpeed runs the ranks in the launch directory, first on PYTHONPATH; so do we where it exists
    launch_dir: str | None = None
    model_check: bool = True  # refuse families AutoTP cannot shard, from config.json (launch/families)
    tp: int | None = None  # ranks per replica (tensor-parallel degree); None: every rank, one replica
    routers: int | None = None  # routers, one per node from node 0; None: 2 with two nodes or more, else 1
    launcher: str = "ssh"  # how the agents reach the nodes (transport/launchers: local, ssh, slurm, ...)
    launcher_meta: dict[str, str] = field(default_factory=dict)  # what the launcher records (a Slurm job id)

    def __post_init__(self) -> None:
        check_name(self.name)
        self.method.check_flags(self.rdzv_dir)
        launcher_factory(self.launcher)  # a UserError listing the launchers when unknown
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for flag, port in (("--master-port", self.master_port), ("--rdzv-port", self.rdzv_port)):
            if port is not None and not 1 <= port <= 65535:
                raise UserError(f"{flag} {port}: not a TCP port (1-65535)")
        if self.master_port is not None and self.master_port == self.rdzv_port:
            raise UserError("--master-port and --rdzv-port must differ")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts {self.max_restarts}: must be 0 or more")
        if not 0 <= self.restart_backoff <= MAX_BACKOFF_S:
            raise UserError(f"--restart-backoff {self.restart_backoff:g}: must be 0 to {MAX_BACKOFF_S:g} seconds")
        if not 0 <= self.restart_window < math.inf:
            raise UserError(f"--restart-window {self.restart_window:g}: must be 0 (never) or more seconds")
        for flag, value in (
            ("--timeout", self.ready_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--command-timeout", self.command_timeout),
            ("--pg-timeout", self.pg_timeout),
        ):
            positive_seconds(flag, value)
        if self.parallelism < 1:
            raise UserError(f"--parallelism {self.parallelism}: must be at least 1")
        for key in self.env:
            if not _ENV_KEY_RE.match(key):
                raise UserError(f"--env {key!r}: not a valid environment variable name")
        if not self.nodes:
            raise UserError("no nodes to run on")
        self._check_tp()
        self._check_routers()
        if self.serve.shm_allreduce and any(len(r.units) > 1 for r in self.replicas):
            raise UserError("--shm-allreduce needs every replica's ranks on one node (it is shared memory)")
        if self.launch_dir is not None and not self.launch_dir.startswith("/"):
            raise UserError(f"launch directory {self.launch_dir!r}: must be an absolute path")
        self._check_visible_devices()

    def _check_tp(self) -> None:
        if self.tp is None:
            return
        world = self.world_size
        if self.tp < 1:
            raise UserError(f"--tp {self.tp}: must be at least 1")
        if world % self.tp:
            choices = ", ".join(map(str, divisors(world)))
            raise UserError(
                f"--tp {self.tp}: the job has {world} rank(s), which {self.tp} does not divide into replicas; "
                f"choose one of {choices}"
            )

    def _check_routers(self) -> None:
        if self.routers is None:
            return
        if self.routers < 1:
            raise UserError(f"--routers {self.routers}: must be at least 1")
        if self.routers > len(self.nodes):
            raise UserError(
                f"--routers {self.routers}: the job has {len(self.nodes)} node(s), and each router runs on a "
                f"node of its own; choose 1 to {len(self.nodes)}"
            )

    @property
    def router_count(self) -> int:
        """The routers: --routers, else two when the job has two nodes or more (a standby), else one."""
        return self.routers if self.routers is not None else min(2, len(self.nodes))

    @property
    def method(self) -> InitMethod:
        """The `--init-method` (wire/initmethods): its flags, URL, pre-flight check and group set-up."""
        return init_method(self.init_method)

    @property
    def tp_size(self) -> int:
        """Ranks per replica: the tensor-parallel degree the model is sharded over."""
        return self.tp or self.world_size

    @property
    def replicas(self) -> list[Replica]:
        return place(self.nodes, self.tp_size)

    def _check_visible_devices(self) -> None:
        """CUDA_VISIBLE_DEVICES comes from the selected slots; a user value may only agree with it."""
        value = self.env.get(VISIBLE_DEVICES)
        if value is None:
            return
        given = ",".join(v.strip() for v in value.split(",") if v.strip())
        for n in self.nodes:
            want = ",".join(map(str, n.slot_ids))
            if given != want:
                src = self.env_sources.get(VISIBLE_DEVICES, "--env")
                raise UserError(
                    f"{VISIBLE_DEVICES}={value} ({src}) conflicts with the slots selected on {n.host} ({want}): "
                    f"dslaunch sets it from the slots; remove it and choose GPUs with --include '{n.host}:{given}'"
                )

    @property
    def world_size(self) -> int:
        return sum(n.nprocs for n in self.nodes)


def parse_env_pairs(pairs: tuple[str, ...] | list[str], source: str = "--env") -> dict[str, str]:
    """Parse KEY=VAL items (from `--env` or lines of an env file); errors name the item."""
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise UserError(f"{source} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def read_env_file(path: str | Path, flag: str = "--env-file") -> dict[str, str]:
    """Read a KEY=VALUE file (comments and blank lines allowed, optional `export `)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot read ({e.strerror})") from None
    out: dict[str, str] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise UserError(f"{p}:{lineno}: expected KEY=VALUE, got {raw.strip()!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


@dataclass
class UserEnv:
    """The user's environment for every node, where each value came from, and what to expand."""

    values: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    expand: tuple[str, ...] = ()

    def set(self, values: dict[str, str], source: str) -> None:
        self.values.update(values)
        self.sources.update(dict.fromkeys(values, source))


def deepspeed_env_files(launch_env: dict[str, str] | os._Environ, cwd: Path, home: Path) -> list[Path]:
    """DeepSpeed's `.deepspeed_env` (or `DS_ENV_FILE`'s name) in the home directory, then in the
    working directory; both are read, the working directory's values win. An absolute
    `DS_ENV_FILE` is that one file."""
    name = launch_env.get("DS_ENV_FILE") or DEEPSPEED_ENV_NAME
    return list(dict.fromkeys(base / os.path.expanduser(name) for base in (home, cwd)))


def collect_user_env(
    launch_env: dict[str, str] | os._Environ,
    env_pairs: tuple[str, ...] | list[str] = (),
    env_files: tuple[str, ...] | list[str] = (),
    cwd: Path | None = None,
    home: Path | None = None,
) -> UserEnv:
    """The user environment for every node, lowest precedence first.

    Forwarded launch-host prefixes (NCCL*, PYTHON*, ...), then DeepSpeed's `.deepspeed_env` (home,
    then the working directory), then `--env-file`, then `--env`. `.deepspeed_env` values are
    expanded on the node (`PATH=/opt/bin:$PATH` extends the node's PATH), as DeepSpeed's remote
    shell does; the others are taken as written.
    """
    out = UserEnv()
    out.set({k: v for k, v in launch_env.items() if k.startswith(FORWARD_PREFIXES)}, "the launch environment")
    ds_files: set[str] = set()
    for f in deepspeed_env_files(launch_env, cwd or Path.cwd(), home or Path.home()):
        if f.is_file():
            out.set(read_env_file(f, flag=DEEPSPEED_ENV_NAME), str(f))
            ds_files.add(str(f))
    for f in env_files:
        out.set(read_env_file(f), f"--env-file {f}")
    out.set(parse_env_pairs(env_pairs), "--env")
    out.expand = tuple(k for k, v in out.values.items() if "$" in v and out.sources[k] in ds_files)
    return out


def collect_env(
    launch_env: dict[str, str] | os._Environ,
    env_pairs: tuple[str, ...] | list[str] = (),
    env_files: tuple[str, ...] | list[str] = (),
    cwd: Path | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """The values of `collect_user_env`."""
    return collect_user_env(launch_env, env_pairs, env_files, cwd, home).values
