"""What a supervisor (`node.supervise`) gives its child: listening sockets held across restarts,
and a file that says the child got ready.

The supervisor binds them once; each child finds its inherited descriptors by address in
LISTEN_FDS_ENV (JSON: {"host:port": fd}) and serves on them instead of binding, so the address
never becomes free while the job runs. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping

from dslaunch.wire.serve import DEFAULT_FRONT_PORT, ServeSpec

LISTEN_FDS_ENV = "DSLAUNCH_LISTEN_FDS"
READY_ENV = "DSLAUNCH_READY_FILE"  # the child creates this file once it serves (its back-off resets)


def key(host: str, port: int) -> str:
    return f"{host}:{port}"


def encode(fds: Mapping[str, int]) -> str:
    return json.dumps(dict(fds), sort_keys=True)


def router_addresses(env: Mapping[str, str]) -> list[tuple[str, int]]:
    """The router's link and public addresses, from its RouterEnv variables (none outside a router)."""
    if "DSLAUNCH_LINK_PORT" not in env:
        return []
    serve = ServeSpec.from_json(env.get("DSLAUNCH_SERVE", "{}"))
    return [(env["DSLAUNCH_LINK_BIND"], int(env["DSLAUNCH_LINK_PORT"])), (serve.bind, serve.port or DEFAULT_FRONT_PORT)]


def inherited(host: str, port: int, env: Mapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket the supervisor holds for this address, or None (bind it yourself)."""
    e = os.environ if env is None else env
    try:
        fd = json.loads(e.get(LISTEN_FDS_ENV) or "{}").get(key(host, port))
    except (ValueError, AttributeError):
        return None
    if not isinstance(fd, int):
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    sock.setblocking(False)
    return sock
