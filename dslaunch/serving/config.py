"""What rank 0's front is configured with: the part of the job's ServeSpec the front enforces.

The defaults are ServeSpec's own (one place for every default of `up`'s serving flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dslaunch.wire.protocol import Limits
from dslaunch.wire.serve import DEFAULT_FRONT_PORT, ServeSpec

_DEFAULTS = ServeSpec()


@dataclass(frozen=True)
class FrontConfig:
    bind: str = _DEFAULTS.bind
    port: int = DEFAULT_FRONT_PORT
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = _DEFAULTS.max_batch_size
    batch_wait_ms: float = _DEFAULTS.batch_wait_ms
    max_queue: int = _DEFAULTS.max_queue
    request_timeout: float = _DEFAULTS.request_timeout
    idle_timeout: float = _DEFAULTS.idle_timeout
    max_connections: int = _DEFAULTS.max_connections  # beyond this a new connection gets `overloaded`, then close
    max_inflight: int = _DEFAULTS.max_inflight  # requests running at once on one connection; reading pauses
    write_timeout: float = _DEFAULTS.write_timeout  # a client that does not take an answer within this is cut off
    auth_timeout: float = 10.0  # a connection that must authenticate does so within this, fixed
    token: str | None = None
    nonce: str | None = None  # proves to clients that this is their job's front (see `health` challenge)
    served_model_name: str | None = None  # the model id of the HTTP API (default: the model dir's name)

    @classmethod
    def from_serve(
        cls, serve: ServeSpec, token: str | None, nonce: str | None = None, model_name: str | None = None
    ) -> FrontConfig:
        """The front's view of the job's serving flags; token and nonce come separately (0600 files)."""
        return cls(
            bind=serve.bind,
            port=serve.port or DEFAULT_FRONT_PORT,
            limits=Limits(
                max_request_bytes=serve.max_request_bytes,
                max_prompts=serve.max_batch_size,
                max_new_tokens=serve.max_new_tokens,
            ),
            max_batch_size=serve.max_batch_size,
            batch_wait_ms=serve.batch_wait_ms,
            max_queue=serve.max_queue,
            request_timeout=serve.request_timeout,
            idle_timeout=serve.idle_timeout,
            max_connections=serve.max_connections,
            max_inflight=serve.max_inflight,
            write_timeout=serve.write_timeout,
            token=token,
            nonce=nonce,
            served_model_name=serve.served_model_name or model_name,
        )
