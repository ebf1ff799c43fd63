"""What `status` and `up` read from this node: agent and rank state, and why workers failed."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dslaunch.node.agent import agent_state
from dslaunch.node.logs import tail
from dslaunch.node.procs import alive, job_processes, rss_mb
from dslaunch.wire.jsonio import read_json
from dslaunch.wire.nodedir import NodeDir


def op_status(args: dict[str, Any]) -> dict[str, Any]:
    """Agent and per-rank state of this node, with log tails when something went wrong."""
    nd = NodeDir.at(args["node_dir"])
    ndir = nd.root
    if not ndir.is_dir():
        return {"present": False, "agent": {"pid": None, "alive": False, "exit_code": None},
                "ranks": [], "procs": len(job_processes(args["job_id"], args["node_rank"]))}  # fmt: skip
    agent = agent_state(nd, args["job_id"], args["node_rank"])
    ranks = []
    for f in sorted(nd.ranks.glob("rank*.json")):
        r = read_json(f)
        if r is None:
            continue
        pid = r.get("pid")
        r["alive"] = bool(pid and alive(pid))
        r["rss_mb"] = rss_mb(pid) if r["alive"] else None
        ranks.append(r)
    out: dict[str, Any] = {
        "present": True,
        "agent": agent,
        "ranks": ranks,
        "procs": len(job_processes(args["job_id"], args["node_rank"])),
    }
    front = read_json(nd.front_status)
    if front is not None:
        front["alive"] = bool(front.get("pid") and alive(front["pid"]))
        front["age_s"] = round(time.time() - float(front.get("time", 0)), 1)  # this node's clock
        out["front"] = front
    tail_n = int(args.get("tail", 0))
    failed = tail_n and (not agent["alive"] or any(r.get("error") for r in ranks))
    # the log reads are for `status` only: `up` polls this op several times a second
    agent_log = tail(nd.agent_log, 2000) if failed or args.get("failures") else []
    if args.get("failures"):
        out["failures"] = worker_failures(agent_log, nd.logs)[-5:]
    if failed:
        out["agent_log"] = agent_failure(agent_log[-400:], keep=tail_n)
        out["rank_logs"] = {str(r["rank"]): tail(nd.rank_log(r["rank"]), tail_n) for r in ranks}
    return out


def watch(args: dict[str, Any]) -> Iterator[str]:
    """`status` as it changes: a line when the answer changes, and one every `heartbeat` seconds
    otherwise, so the launch host can tell a quiet node from a lost one. A closed connection ends
    it at its next line (the write fails); `max_s` bounds it in any case."""
    every = float(args.get("every", 0.25))
    beat = float(args.get("heartbeat", 1.0))
    end = time.monotonic() + float(args.get("max_s", 3600))
    last, sent = "", 0.0
    while time.monotonic() < end:
        st = op_status(args)
        key = json.dumps(_stable(st), sort_keys=True)
        now = time.monotonic()
        if key != last or now - sent >= beat:
            yield json.dumps(st)
            last, sent = key, now
        time.sleep(every)


def _stable(st: dict[str, Any]) -> dict[str, Any]:
    """The answer without what changes on every read (memory, the front file's age)."""
    out = {**st, "ranks": [{k: v for k, v in r.items() if k != "rss_mb"} for r in st.get("ranks", [])]}
    if "front" in st:
        out["front"] = {k: v for k, v in st["front"].items() if k not in ("age_s", "time")}
    return out


_TORCH_LOG_RE = re.compile(r"^[WEIF]\d{4} \d\d:")
# torchrun's line when a worker ends badly, e.g.
# E1123 12:40:56.783000 1439 .../api.py:1002] failed (exitcode: -9) local_rank: 0 (pid: 2276) of binary: ...


# torchrun's line when a worker ends badly, e.g.
# E1123 12:40:56.783000 1439 .../api.py:1002] failed (exitcode: -9) local_rank: 0 (pid: 2276) of binary: ...
_FAILED_RE = re.compile(
    r"^[WEIF](\d\d)(\d\d) (\d\d:\d\d:\d\d)\S* .*\bfailed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)"
)


# the agent's own traceback starts in one of these (plain torchrun, or dslaunch's warm one)
_AGENT_FILES = ("torch/distributed/run.py", "dslaunch/rank/torchrun.py")
_MARKER_RE = re.compile(r"^--- rank (\d+) pid (\d+) attempt (\d+)")


def worker_failures(agent_lines: list[str], logs: Path) -> list[dict[str, Any]]:
    """Every worker this node's agent saw fail: when, exit code (negative: signal), and its last words.

    Restarts overwrite the ranks' status files; the agent log and the rank logs (appended across
    attempts, each attempt opened by a marker line with its pid) are what remembers why.
    """
    out: list[dict[str, Any]] = []
    for line in agent_lines:
        m = _FAILED_RE.match(line)
        if m:
            month, day, clock, code, local_rank, pid = m.groups()
            out.append({"when": f"{month}-{day} {clock}", "exit_code": int(code), "local_rank": int(local_rank),
                        "pid": int(pid)})  # fmt: skip
    if not out:
        return out
    attempts: dict[int, tuple[int, int]] = {}  # pid -> (rank, job-wide attempt)
    last_words: dict[int, str] = {}
    for log in logs.glob("rank*.log"):
        pid = None
        for line in tail(log, 5000):
            mk = _MARKER_RE.match(line)
            if mk:
                pid = int(mk.group(2))
                attempts[pid] = (int(mk.group(1)), int(mk.group(3)))
            elif pid and line.strip() and not _TORCH_LOG_RE.match(line):
                last_words[pid] = line.strip()[:300]
    for f in out:
        f["rank"], f["attempt"] = attempts.get(f["pid"], (None, None))
        if f["exit_code"] > 0 and f["pid"] in last_words:
            f["last_line"] = last_words[f["pid"]]
    return out


def agent_failure(lines: list[str], keep: int = 12) -> list[str]:
    """The useful part of a failed agent's log: what the workers printed, then torchrun's root cause.

    torchrun ends with a long traceback of its own and a summary; the cause a user needs is the
    worker output before it and the "Root Cause" block.
    """
    end = next((i for i, ln in enumerate(lines) if any(a in ln for a in _AGENT_FILES)), len(lines))
    start = end
    while start > 0 and not lines[start - 1].startswith("Traceback"):
        start -= 1
    body = lines[: start - 1] if start > 0 else lines[:end]
    worker = [ln for ln in body if ln.strip() and not _TORCH_LOG_RE.match(ln) and not ln.startswith("*****")
              and "OMP_NUM_THREADS" not in ln][-keep:]  # fmt: skip
    root: list[str] = []
    if "Root Cause (first observed failure):" in "\n".join(lines):
        i = max(i for i, ln in enumerate(lines) if "Root Cause (first observed failure):" in ln)
        for ln in lines[i + 1 :]:
            if ln.startswith("====="):
                break
            if ln.strip().startswith(("rank", "exitcode", "host", "traceback")):
                root.append("root cause: " + " ".join(ln.split()))
    elif end < len(lines):  # the agent itself failed (before or between its workers): its own error
        own = [ln for ln in lines[end:] if ln.strip() and not ln.startswith((" ", "Traceback"))]
        root = [f"agent error: {own[-1].strip()}"] if own else []
    return worker + root
