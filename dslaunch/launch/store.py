"""The job record on the launch host: `$DSLAUNCH_HOME/jobs/<name>.json` (default ~/.dslaunch).

Written atomically (temp file + rename, 0600) so a Ctrl-C never leaves half a record, and guarded
by a per-name lock so two `up`s of the same name cannot both start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from dslaunch.errors import UserError
from dslaunch.wire.records import JobRecord

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(name: str) -> str:
    """The job name, or a UserError: it becomes a file name, so no '/', no '..', nothing hidden."""
    if not NAME_RE.fullmatch(name):
        raise UserError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63, starting with a letter or digit)"
        )
    return name


def home() -> Path:
    return Path(os.environ.get("DSLAUNCH_HOME") or Path.home() / ".dslaunch")


def jobs_dir() -> Path:
    d = home() / "jobs"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def record_path(name: str) -> Path:
    return jobs_dir() / f"{check_name(name)}.json"


def save(rec: JobRecord) -> None:
    path = record_path(rec.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rec.to_dict(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(name: str) -> JobRecord | None:
    path = record_path(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: job record is unreadable ({e}); remove it by hand") from None
    try:
        return JobRecord.from_dict(data)
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{path}: job record is from another dslaunch version ({e})") from None


def require(name: str) -> JobRecord:
    rec = load(name)
    if rec is None:
        names = list_names()
        hint = f" (jobs here: {', '.join(names)})" if names else " (no jobs here; start one with dslaunch up)"
        raise UserError(f"no job named {name!r} in {jobs_dir()}{hint}")
    return rec


def remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(name).unlink()


def list_names() -> list[str]:
    return sorted(p.stem for p in jobs_dir().glob("*.json") if NAME_RE.fullmatch(p.stem))


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the job's lock; a second holder is refused at once rather than made to wait."""
    path = jobs_dir() / f".{check_name(name)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another dslaunch command is working on job {name!r} right now; wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)
