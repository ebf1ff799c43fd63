"""The model directory on this node: its per-file hashes, and taking in a copy safely.

A copy arrives as `FILE.dslaunch-part` (written over SFTP by the launch host) and only becomes
FILE here, after its hash matched: nothing half-written ever carries the file's own name. A part
file left by an interrupted copy is reported, so the next copy continues it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dslaunch.errors import NodeOpError
from dslaunch.wire.filehash import PART_SUFFIX, hash_file, manifest, remember


def _root(args: dict[str, Any]) -> Path:
    d = args.get("dir")
    if not isinstance(d, str) or not d:
        raise NodeOpError("no model directory given")
    return Path(d).expanduser()


def _free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the filesystem that holds (or would hold) `path`."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def _parts(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(PART_SUFFIX):
                full = Path(dirpath) / name
                out[str(full.relative_to(root))[: -len(PART_SUFFIX)]] = full.stat().st_size
    return out


def op_model_hashes(args: dict[str, Any]) -> dict[str, Any]:
    """{"exists", "files": {rel: {size, sha256}}, "parts": {rel: bytes so far}, "free": bytes}."""
    root = _root(args)
    if not root.is_dir():
        return {"exists": False, "files": {}, "parts": {}, "free": _free_bytes(root)}
    try:
        files = manifest(root)
        parts = _parts(root)
    except OSError as e:
        raise NodeOpError(f"cannot read {e.filename or root}: {e.strerror}") from None
    return {"exists": True, "files": files, "parts": parts, "free": _free_bytes(root)}


def op_model_prepare(args: dict[str, Any]) -> dict[str, Any]:
    """Create the directories the copy needs; {"root": the absolute directory}."""
    root = _root(args)
    try:
        for sub in args.get("dirs", []) or [""]:
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NodeOpError(f"cannot create {e.filename or root}: {e.strerror}") from None
    return {"root": str(root.resolve())}


def op_model_commit(args: dict[str, Any]) -> dict[str, Any]:
    """Give each part file whose hash matches its file's name; remove the ones that do not."""
    root = _root(args)
    done: list[str] = []
    bad: list[str] = []
    for rel, want in (args.get("files") or {}).items():
        part = root / (rel + PART_SUFFIX)
        try:
            if hash_file(part) == want:
                os.replace(part, root / rel)
                remember(root / rel, want)  # the next pre-flight need not read it again
                done.append(rel)
            else:
                part.unlink()
                bad.append(rel)
        except OSError as e:
            raise NodeOpError(f"cannot finish {rel}: {e.strerror}") from None
    return {"committed": done, "bad": bad}
