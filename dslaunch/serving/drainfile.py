"""The router's `drain` file (written by `dslaunch restart` through nodectl): read strictly, safely.

Its one format is a JSON list of replica ids, integers from 0 to replicas-1 (`[]`: none). Anything
else (`[true]`, `[1.9]`, `"01"`, `[" 0 "]`, `[1e400]`, a number out of range, an empty file) is
refused with a reason, and the router keeps the drain set it had: a bad file never undrains. The
file is opened without following a symbolic link and without blocking (a FIFO is refused, not
waited on), must be a regular file, and is read at most MAX_BYTES; the read runs off the event loop.
A missing file means no replica is draining.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 16


class BadDrainFile(ValueError):
    """The file is not a drain list; the message says why (no file content in it)."""


def read(path: Path, replicas: int) -> frozenset[int]:
    """The replica ids the file names; raises BadDrainFile (keep the previous set)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return frozenset()
    except OSError as e:
        raise BadDrainFile(f"cannot open it ({e.strerror}; a symbolic link is not followed)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadDrainFile("it is not a regular file")
        if st.st_size > MAX_BYTES:
            raise BadDrainFile(f"it is over {MAX_BYTES} bytes")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    return parse(data, replicas)


def parse(data: bytes, replicas: int) -> frozenset[int]:
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise BadDrainFile("it is not JSON") from None
    if not isinstance(doc, list):
        raise BadDrainFile("it is not a JSON list of replica ids")
    for item in doc:
        if type(item) is not int:  # bool is an int subclass, and is refused
            raise BadDrainFile(f"{_shown(item)} is not a replica id (an integer)")
        if not 0 <= item < replicas:
            raise BadDrainFile(f"{item} is not a replica of this job (0 to {replicas - 1})")
    return frozenset(doc)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _shown(item: Any) -> str:
    return json.dumps(item)[:40]
