"""What rank 0's front is configured with (built from the job's ServeSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dslaunch.wire.protocol import Limits


@dataclass(frozen=True)
class FrontConfig:
    bind: str = "127.0.0.1"
    port: int = 7070
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout: float = 300.0
    idle_timeout: float = 300.0
    token: str | None = None
