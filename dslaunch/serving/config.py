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
    max_connections: int = 512  # beyond this a new connection gets `overloaded` (HTTP 429) and is closed
    max_inflight: int = 16  # requests running at once on one connection; reading pauses at the cap
    write_timeout: float = 30.0  # a client that does not take an answer within this is cut off
    auth_timeout: float = 10.0  # a connection that must authenticate does so within this, fixed
    token: str | None = None
    nonce: str | None = None  # proves to clients that this is their job's front (see `health` challenge)
    served_model_name: str | None = None  # the model id of the HTTP API (default: the model dir's name)
