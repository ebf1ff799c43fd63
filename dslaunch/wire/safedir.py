"""Directories dslaunch trusts: its state on the launch host and the job directories on the nodes.

dslaunch runs what a job record names (the nodes' `python`) and removes node directories with
`rmtree`. A directory that another user owns or may write into, or a symbolic link that someone
could point elsewhere, would let that user choose what runs or what is removed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def unsafe_reason(path: Path) -> str | None:
    """Why `path` is not a private directory of ours (None when it is one).

    Private: a real directory (not a symbolic link), owned by the effective user, writable by
    nobody else.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o}; chmod go-w it)"
    return None


def shared_parent_reason(path: Path) -> str | None:
    """Why `path`, a directory that holds private ones, is unsafe (None when it is fine).

    Laxer than `unsafe_reason`: it may be a symbolic link or root's, and world-writable only
    with the sticky bit (like /tmp), where nobody can rename or remove what we create in it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (os.geteuid(), 0):
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by other users without the sticky bit (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def make_private(path: Path) -> str | None:
    """Create `path` (0700) unless it exists; then why it is unsafe, or None."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot be created ({e.strerror})"
    return unsafe_reason(path)
