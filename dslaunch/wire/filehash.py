"""A model directory's content as per-file hashes, on the launch host and on every node alike.

Standard library only: nodectl computes it on each node (`node/modelfiles.py`). Files are read in
chunks (a safetensors file can be tens of GB) and hashed in parallel across files (hashlib drops
the GIL while it hashes). Results are cached by (path, device, inode, size, mtime), so a second
`up` does not read gigabytes again; the device and inode keep two filesystems' copies at one path
apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CHUNK = 8 << 20
PART_SUFFIX = ".dslaunch-part"  # a file being copied in; never taken for the file itself
CACHE_NAME = "model-hashes.json"
MAX_CACHE = 4096  # entries kept; the oldest go first


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dslaunch" / CACHE_NAME


def hash_file(path: str | os.PathLike[str], start: int = 0, digest: hashlib._Hash | None = None) -> str:
    """The file's sha256, read in chunks."""
    h = digest or hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under `root`, relative, sorted; hidden files and partial copies left out."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.endswith(PART_SUFFIX):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(os.path.relpath(full, root))
    return sorted(out)


def _key(full: str, st: os.stat_result) -> str:
    return f"{full}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, new: dict[str, str]) -> None:
    """Merge `new` into the cache file, under a lock and atomically: nodes sharing a home directory
    (NFS) share the file, and none may drop what another wrote. A cache that cannot be written
    only costs a rehash next time."""
    import fcntl
    import tempfile  # here, not at import: nodectl starts for every op

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = _load_cache(path)
            for k, v in new.items():
                cache.pop(k, None)
                cache[k] = v
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-")
            with os.fdopen(fd, "w") as f:
                json.dump(dict(list(cache.items())[-MAX_CACHE:]), f)
            os.replace(tmp, path)


def remember(path: str | os.PathLike[str], digest: str, cache: Path | None = None) -> None:
    """Record a hash just checked (a copied file, before its rename keeps inode and mtime)."""
    full = Path(path).expanduser().resolve()
    _save_cache(cache or cache_path(), {_key(str(full), os.stat(full)): digest})


def manifest(root: str | os.PathLike[str], workers: int = 8, cache: Path | None = None) -> dict[str, dict[str, object]]:
    """{relative path: {"size", "sha256"}} for every file under `root`."""
    base = Path(root).expanduser().resolve()
    cache = cache or cache_path()
    known = _load_cache(cache)
    files = list_files(base)
    stats = {rel: os.stat(base / rel) for rel in files}
    keys = {rel: _key(str(base / rel), stats[rel]) for rel in files}
    todo = [rel for rel in files if keys[rel] not in known]
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        todo.sort(key=lambda rel: -stats[rel].st_size)  # the big ones first, so they overlap
        fresh: dict[str, str] = {}
        with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
            for rel, digest in zip(todo, pool.map(lambda r: hash_file(base / r), todo), strict=True):
                fresh[keys[rel]] = digest
        known.update(fresh)
        _save_cache(cache, fresh)
    return {rel: {"size": stats[rel].st_size, "sha256": known[keys[rel]]} for rel in files}


def differences(want: dict[str, dict[str, object]], have: dict[str, dict[str, object]]) -> list[tuple[str, str]]:
    """(file, why) for each file of `want` that `have` lacks or holds with other content."""
    out: list[tuple[str, str]] = []
    for rel, w in want.items():
        h = have.get(rel)
        if h is None:
            out.append((rel, "missing"))
        elif h.get("size") != w["size"]:
            out.append((rel, f"{h.get('size')} bytes, not {w['size']}"))
        elif h.get("sha256") != w["sha256"]:
            out.append((rel, "different content"))
    return out
