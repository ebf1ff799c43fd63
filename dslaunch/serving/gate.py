"""Who may hold a connection to the front: two bounded pools, so strangers cannot crowd out users.

On a front with a token, a connection that has not authenticated yet sits in the pre-auth pool
(as many slots as --max-connections); when that pool is full, a newcomer takes the slot of the
oldest stranger, which is closed. A connection that authenticates moves to the main pool, which
--max-connections caps (beyond it: `overloaded`). A flood of idle connections that never
authenticate therefore churns only its own pool, while a client with the token, which
authenticates with its first line, keeps being served. Without a token every connection is in
the main pool from the start, as before.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class Gate:
    def __init__(self, max_connections: int, preauth: bool) -> None:
        self.cap = max_connections
        self.preauth = preauth
        self.strangers: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # oldest first
        self.members: set[asyncio.StreamWriter] = set()
        self.evicted = 0  # strangers closed to make room for newer ones

    def __len__(self) -> int:
        return len(self.strangers) + len(self.members)

    def enter(self, writer: asyncio.StreamWriter) -> bool:
        """A new connection: False when the main pool is full (the front answers `overloaded`)."""
        if not self.preauth:
            if len(self.members) >= self.cap:
                return False
            self.members.add(writer)
            return True
        if len(self.strangers) >= self.cap:
            oldest, _ = self.strangers.popitem(last=False)
            self.evicted += 1
            oldest.transport.abort()
        self.strangers[writer] = None
        return True

    def promote(self, writer: asyncio.StreamWriter) -> bool:
        """The connection authenticated: into the main pool, or False when that is full."""
        if writer in self.members:
            return True
        if len(self.members) >= self.cap:
            return False
        self.strangers.pop(writer, None)
        self.members.add(writer)
        return True

    def leave(self, writer: asyncio.StreamWriter) -> None:
        self.strangers.pop(writer, None)
        self.members.discard(writer)
