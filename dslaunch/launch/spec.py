"""The job spec: everything `up` was asked for, built once by the CLI and validated here."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node

INIT_METHODS = ("tcp", "file", "env")
BACKENDS = ("auto", "nccl", "gloo")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Launch-host variables forwarded to every node, as DeepSpeed's launcher does for NCCL_* & co.
FORWARD_PREFIXES = ("NCCL_", "GLOO_", "UCX_", "FI_", "HF_", "TRANSFORMERS_", "TORCH_")
DEEPSPEED_ENV_NAME = ".deepspeed_env"


TASKS = ("generate", "embed")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEFAULT_FRONT_PORT = 7070
_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


MAX_BACKOFF_S = 60.0


def _positive_seconds(flag: str, value: float) -> None:
    """Durations are finite and above 0 (click accepts 'nan' and 'inf' as floats)."""
    if not 0 < value < math.inf:
        raise UserError(f"{flag} {value:g}: must be more than 0 seconds (and finite)")


def backoff_delay(base: float, attempt: int) -> float:
    """Seconds to wait before job-wide attempt `attempt` (0 is the first start).

    The first restart is immediate: one lost rank should cost as little as possible. Later ones
    double from `base`, so a rank that crashes at once cannot spin the whole job in a tight loop.
    """
    if attempt <= 1 or base <= 0:
        return 0.0
    return min(MAX_BACKOFF_S, base * 2 ** (attempt - 2))


@dataclass
class ServeSpec:
    """What the job serves and how rank 0's front behaves; travels to the workers as JSON.

    The token is never part of that JSON: it reaches node 0 as a 0600 file, so it shows in no
    command line, environment or log.
    """

    model: str | None = None
    task: str = "generate"
    dtype: str = "auto"
    kernel_inject: bool = False
    handler: str | None = None
    shm_allreduce: bool = False
    bind: str = "127.0.0.1"
    port: int | None = None  # None: DEFAULT_FRONT_PORT or the next free one
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    request_timeout: float = 300.0
    idle_timeout: float = 300.0
    max_new_tokens: int = 1024
    heartbeat_s: float = 5.0
    hang_timeout: float = 120.0  # 0: never declare a rank hung
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.handler is not None and not _HANDLER_RE.match(self.handler):
            raise UserError(f"--handler {self.handler!r}: expected module:Class, e.g. mypkg.serve:Handler")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: not a TCP port (1-65535)")
        for flag, value, lo in (
            ("--max-batch-size", self.max_batch_size, 1),
            ("--max-queue", self.max_queue, 1),
            ("--max-request-bytes", self.max_request_bytes, 256),
            ("--max-new-tokens", self.max_new_tokens, 1),
        ):
            if value < lo:
                raise UserError(f"{flag} {value}: must be at least {lo}")
        if not 0 <= self.batch_wait_ms < math.inf:
            raise UserError(f"--batch-wait-ms {self.batch_wait_ms}: must be 0 or more")
        for flag, value in (
            ("--request-timeout", self.request_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--heartbeat", self.heartbeat_s),
        ):
            _positive_seconds(flag, value)
        if not 0 <= self.hang_timeout < math.inf or 0 < self.hang_timeout < 2 * self.heartbeat_s:
            raise UserError(
                f"--hang-timeout {self.hang_timeout:g}: must be 0 (off) or at least twice --heartbeat "
                f"({2 * self.heartbeat_s:g} s), or an idle job would look hung"
            )
        if self.token is not None and len(self.token) < 16:
            raise UserError("the front's token must have at least 16 characters")

    @property
    def loopback(self) -> bool:
        """The front binds only node 0's loopback (reached through an SSH tunnel from elsewhere)."""
        if self.bind == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("token")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServeSpec:
        d: dict[str, Any] = json.loads(text)
        d.pop("token", None)
        return cls(**d)


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

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise UserError(
                f"--name {self.name!r}: use letters, digits, '.', '_' or '-' (at most 63, "
                "starting with a letter or digit)"
            )
        if self.init_method not in INIT_METHODS:
            raise UserError(f"--init-method {self.init_method!r}: choose one of {', '.join(INIT_METHODS)}")
        if self.init_method == "file":
            if not self.rdzv_dir:
                raise UserError("--init-method file needs --rdzv-dir: a directory every node sees (e.g. on NFS)")
            if not self.rdzv_dir.startswith("/"):
                raise UserError(f"--rdzv-dir {self.rdzv_dir!r}: must be an absolute path")
        elif self.rdzv_dir:
            raise UserError(f"--rdzv-dir is only used with --init-method file (not {self.init_method})")
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
        for flag, value in (
            ("--timeout", self.ready_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--command-timeout", self.command_timeout),
            ("--pg-timeout", self.pg_timeout),
        ):
            _positive_seconds(flag, value)
        if self.parallelism < 1:
            raise UserError(f"--parallelism {self.parallelism}: must be at least 1")
        for key in self.env:
            if not _ENV_KEY_RE.match(key):
                raise UserError(f"--env {key!r}: not a valid environment variable name")
        if not self.nodes:
            raise UserError("no nodes to run on")
        if self.serve.shm_allreduce and len(self.nodes) > 1:
            raise UserError("--shm-allreduce needs every rank on one node (it is shared memory)")

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


def collect_env(
    launch_env: dict[str, str] | os._Environ,
    env_pairs: tuple[str, ...] | list[str] = (),
    env_files: tuple[str, ...] | list[str] = (),
    cwd: Path | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """The user environment for every node, lowest precedence first.

    Forwarded launch-host prefixes (NCCL_*, ...), then DeepSpeed's `.deepspeed_env` (home, then
    the working directory, or `DS_ENV_FILE`), then `--env-file`, then `--env`.
    """
    out = {k: v for k, v in launch_env.items() if k.startswith(FORWARD_PREFIXES)}
    ds_files: list[Path] = []
    if launch_env.get("DS_ENV_FILE"):
        ds_files.append(Path(launch_env["DS_ENV_FILE"]))
    else:
        for base in (home or Path.home(), cwd or Path.cwd()):
            ds_files.append(base / DEEPSPEED_ENV_NAME)
    for f in dict.fromkeys(ds_files):
        if f.is_file():
            out.update(read_env_file(f, flag=DEEPSPEED_ENV_NAME))
    for f in env_files:
        out.update(read_env_file(f))
    out.update(parse_env_pairs(env_pairs))
    return out
