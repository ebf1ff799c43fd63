"""What a job serves and how its front behaves: built by the CLI, carried to every rank as JSON.

Shared by the launch host (which validates it) and the ranks (which read it), so it depends on
nothing but the standard library and dslaunch's errors.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dslaunch.errors import UserError

TASKS = ("generate", "embed")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEFAULT_FRONT_PORT = 7070
_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MODEL_NAME_RE = re.compile(r"^[\w.:/-]{1,128}$")


def positive_seconds(flag: str, value: float) -> None:
    """Durations are finite and above 0 (click accepts 'nan' and 'inf' as floats)."""
    if not 0 < value < math.inf:
        raise UserError(f"{flag} {value:g}: must be more than 0 seconds (and finite)")


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
    whole_checkpoint: bool = False  # every rank reads every weight (from_pretrained), not its shard's slices
    handler: str | None = None
    shm_allreduce: bool = False
    bind: str = "127.0.0.1"
    port: int | None = None  # None: DEFAULT_FRONT_PORT or the next free one
    max_batch_size: int = 8
    max_batch_tokens: int = 16384  # KV cache tokens: the block pool's size (the padded cache's bound)
    kv_cache_memory: int | None = None  # bytes of the block pool per rank, instead (None: tokens, or free GPU memory)
    max_step_tokens: int = 128  # tokens one forward pass computes at most (decode tokens + prefill chunks)
    max_itl_ratio: float = 0.0  # >= 1: a step with prompt chunks takes at most this many decode steps' time
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    request_timeout: float = 300.0
    idle_timeout: float = 300.0
    max_connections: int = 512
    max_inflight: int = 16
    write_timeout: float = 30.0
    served_model_name: str | None = None
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
            ("--max-batch-tokens", self.max_batch_tokens, 2),
            ("--max-step-tokens", self.max_step_tokens, 1),
            ("--max-queue", self.max_queue, 1),
            ("--max-request-bytes", self.max_request_bytes, 256),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--max-connections", self.max_connections, 1),
            ("--max-inflight", self.max_inflight, 1),
        ):
            if value < lo:
                raise UserError(f"{flag} {value}: must be at least {lo}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1 << 20:
            raise UserError(f"--kv-cache-memory {self.kv_cache_memory} bytes: must be at least 1MiB")
        if not (self.max_itl_ratio == 0 or 1 <= self.max_itl_ratio < math.inf):
            raise UserError(f"--max-itl-ratio {self.max_itl_ratio}: must be 0 (off) or a number of at least 1")
        if not 0 <= self.batch_wait_ms < math.inf:
            raise UserError(f"--batch-wait-ms {self.batch_wait_ms}: must be 0 or more")
        for flag, value in (
            ("--request-timeout", self.request_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--write-timeout", self.write_timeout),
            ("--heartbeat", self.heartbeat_s),
        ):
            positive_seconds(flag, value)
        if not 0 <= self.hang_timeout < math.inf or 0 < self.hang_timeout < 2 * self.heartbeat_s:
            raise UserError(
                f"--hang-timeout {self.hang_timeout:g}: must be 0 (off) or at least twice --heartbeat "
                f"({2 * self.heartbeat_s:g} s), or an idle job would look hung"
            )
        if self.served_model_name is not None and not _MODEL_NAME_RE.match(self.served_model_name):
            raise UserError(
                f"--served-model-name {self.served_model_name!r}: 1 to 128 letters, digits and . _ - / : characters"
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
