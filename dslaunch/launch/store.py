"""The job record on the launch host: `$DSLAUNCH_HOME/jobs/<name>.json` (default ~/.dslaunch).

Written atomically (temp file + rename, 0600) so a Ctrl-C never leaves half a record, and guarded
by a per-name lock so two `up`s of the same name cannot both start.

A record says which interpreter to run on which hosts, so it is only read from where nobody else
could have put it: a valid job name inside a jobs directory (and $DSLAUNCH_HOME) that is the
user's own, not a symbolic link, and writable by nobody else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dslaunch.errors import UserError
from dslaunch.wire.records import JobRecord
from dslaunch.wire.safedir import unsafe_reason

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
    """`$DSLAUNCH_HOME/jobs`, created 0700; refused unless both are private directories of the user."""
    h = home()
    d = h / "jobs"
    for path, var in ((h, " ($DSLAUNCH_HOME)"), (d, "")):
        try:
            path.mkdir(parents=path is h, exist_ok=True, mode=0o700)
        except OSError as e:
            raise UserError(f"{path}{var}: cannot create the job records directory ({e.strerror})") from None
        why = unsafe_reason(path)
        if why:
            raise UserError(
                f"{path}{var} {why}: job records are kept only in a directory that is yours alone "
                "(set DSLAUNCH_HOME to one, mode 0700)"
            )
    return d


def record_path(name: str) -> Path:
    return jobs_dir() / f"{check_name(name)}.json"


def save(rec: JobRecord) -> None:
    _write_private(record_path(rec.name), json.dumps(rec.to_dict(), indent=1))


def _write_private(path: Path, text: str) -> None:
    """Temp file (0600) + fsync + rename: a reader sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(name: str) -> JobRecord | None:
    path = record_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path}: job record cannot be opened ({e.strerror}); remove it by hand") from None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise UserError(f"{path}: job record is not a private file of yours; remove it by hand")
            data = json.loads(f.read())
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


def pending_path(name: str) -> Path:
    """`<name>.pending`: written by an `up` that waits for Slurm to run the job it submitted,
    before any record exists, so `status` and `down` can find the job meanwhile."""
    return jobs_dir() / f"{check_name(name)}.pending"


def save_pending(name: str, data: dict[str, Any]) -> None:
    _write_private(pending_path(name), json.dumps(data))


def load_pending(name: str) -> dict[str, Any] | None:
    try:
        fd = os.open(pending_path(name), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            data = json.loads(f.read()) if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_pending(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        pending_path(name).unlink()


def remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(name).unlink()


def list_names() -> list[str]:
    return sorted(p.stem for p in jobs_dir().glob("*.json") if NAME_RE.fullmatch(p.stem))


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the job's lock; a second holder is refused at once rather than made to wait."""
    path = jobs_dir() / f".{check_name(name)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
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
