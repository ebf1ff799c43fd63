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


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """`socket.create_connection`, with the keep-alive below: a silent peer ends it in DEAD_PEER_S."""
    sock = socket.create_connection((host, port), timeout=timeout)
    keep_alive(sock, idle_s=2, interval_s=1, count=DEAD_PEER_S - 2)
    return sock


def keep_alive(sock: socket.socket, idle_s: int, interval_s: int, count: int) -> None:
    """Probe after `idle_s` quiet seconds, then every `interval_s`; give up after `count` unanswered
    (and give data unacknowledged as long up too), where the system has the options (Linux;
    elsewhere its own keep-alive defaults)."""
    deadline_ms = (idle_s + interval_s * count) * 1000
    options = (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", count),
               ("TCP_USER_TIMEOUT", deadline_ms))  # fmt: skip
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in options:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
