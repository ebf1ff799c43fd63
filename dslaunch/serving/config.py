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
    token: str | None = None

    @classmethod
    def from_serve(cls, serve: ServeSpec, token: str | None) -> FrontConfig:
        """The front's view of the job's serving flags; the token comes separately (a 0600 file)."""
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
            token=token,
        )
