"""The job record: atomic writes, 0600 files, and a lock that refuses a second holder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dslaunch.errors import UserError
from dslaunch.launch import store as state
from dslaunch.wire.records import FrontRecord, JobRecord, NodeRecord
from dslaunch.wire.states import JobState


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSLAUNCH_HOME", str(tmp_path / "h"))


def _rec(name: str = "j") -> JobRecord:
    nodes = [NodeRecord(0, "n0", "u@n0", 2, 0, "/w/j-1/node0", "10.0.0.1", 123)]
    front = FrontRecord("127.0.0.1", 7070, True, "generate", "m", token="t" * 20)
    return JobRecord(name, "1", f"{name}-1", JobState.READY, 2, "tcp", "gloo", "/py", "10.0.0.1", 1, 2, nodes,
                     front=front)  # fmt: skip


def test_roundtrip_and_permissions() -> None:
    state.save(_rec())
    path = state.record_path("j")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert state.load("j") == _rec()
    assert state.list_names() == ["j"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    state.remove("j")
    assert state.load("j") is None


def test_require_names_the_jobs_there() -> None:
    with pytest.raises(UserError, match=r"no job named 'x'.*no jobs here"):
        state.require("x")
    state.save(_rec("other"))
    with pytest.raises(UserError, match=r"jobs here: other"):
        state.require("x")


def test_corrupt_record_is_one_line() -> None:
    state.jobs_dir()
    state.record_path("bad").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        state.load("bad")


def test_lock_refuses_a_second_process() -> None:
    code = (
        "from dslaunch.launch import store as state\n"
        "try:\n    with state.locked('j'): print('got it')\n"
        "except Exception as e: print(type(e).__name__, e)\n"
    )
    with state.locked("j"):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert "another dslaunch command is working on job 'j'" in res.stdout
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.stdout.strip() == "got it"


def test_a_record_written_by_the_previous_layout_still_loads() -> None:
    """Records of running jobs survive an upgrade: the front used to sit in an untyped `extra`."""
    d = _rec().to_dict()
    front = d.pop("front")
    d["extra"] = {"front": front}
    d["state"] = "ready"
    assert JobRecord.from_dict(d) == _rec()
