"""TCP connections that notice a peer gone silent (power, cable, partition) in seconds.

Such a host resets nothing, so a client waiting on it would wait for its whole time-out. TCP
keep-alive probes (answered by the peer's kernel, so a long generation is not mistaken for
silence) and TCP_USER_TIMEOUT (for data sent but never acknowledged) end the connection with
ETIMEDOUT instead; the client (`dslaunch/client.py`) then moves the request on as for a reset one.
"""

from __future__ import annotations

import contextlib
import socket

DEAD_PEER_S = 5  # a peer that vanished from the network is given up after about this long
_TCP_OPTIONS = (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", DEAD_PEER_S - 2),
                ("TCP_USER_TIMEOUT", DEAD_PEER_S * 1000))  # fmt: skip


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """`socket.create_connection`, with the keep-alive above where the system has the options
    (Linux; elsewhere its own keep-alive defaults)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _TCP_OPTIONS:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock
