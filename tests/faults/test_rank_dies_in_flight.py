"""A rank of the only replica is SIGKILLed while requests are in flight: the gang restarts while
the router holds the requests, every accepted request gets exactly one answer (its result: none
fails), and clients that do not retry ride through the restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError
from dslaunch.engine.tinymodel import NAME
from tests.conftest import Cli, front_port, job_pids, status_json
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh

PROMPTS = ["Hello world", "The quick brown fox", "One command", "Numbers 0 1 2"]


def _reference(model_dir: Path, k: int) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = {}
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        out[p] = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def test_no_request_fails_when_the_only_replica_restarts(sim: SimCluster, cli: Cli) -> None:
    res = cli.up("-H", str(sim.hostfile(slots=1)), "--tp", "2", "--timeout", "180", "--port", front_port())
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
    port = rec["front"]["port"]
    want = _reference(cli.work_dir / "models" / NAME, 24)
    victim = status_json(cli)["ranks"][1]["pid"]

    # clients that do not retry, each sending requests one after another across the fault
    results: dict[tuple[int, int], str] = {}
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with Client("127.0.0.1", port, retry_for=0, timeout=150) as c:
                for i in range(6):
                    results[(n, i)] = c.generate(PROMPTS[(n + i) % 4], max_new_tokens=24)["text"]
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()

    # and one raw connection with many requests in flight at the moment of the kill
    raw = socket.create_connection(("127.0.0.1", port), timeout=150)
    ids = list(range(100, 116))
    raw.sendall(b"".join(
        json.dumps({"id": i, "op": "generate", "prompt": PROMPTS[i % 4], "max_new_tokens": 24}).encode() + b"\n"
        for i in ids
    ))  # fmt: skip
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    answers: dict[int, list[dict[str, Any]]] = {}
    f = raw.makefile("rb")
    deadline = time.monotonic() + 120
    while len(answers) < len(ids) and time.monotonic() < deadline:
        line = f.readline()
        if not line:
            break
        a = json.loads(line)
        answers.setdefault(a["id"], []).append(a)
    raw.close()
    assert sorted(answers) == ids, "every accepted request is answered (none dropped)"
    for i, got in answers.items():
        assert len(got) == 1, f"request {i} answered {len(got)} times"
        assert got[0]["ok"], got[0]
        assert got[0]["text"] == want[PROMPTS[i % 4]]

    for t in threads:
        t.join(200)
    assert not failures, failures
    assert len(results) == 24
    for (n, i), text in results.items():
        assert text == want[PROMPTS[(n + i) % 4]], (n, i)

    st = status_json(cli)
    assert st["state"] == "ready" and {r["restarts"] for r in st["ranks"]} == {1}
    assert st["front"]["ready"] and st["front"]["address"] == f"127.0.0.1:{port}"
    with Client("127.0.0.1", port, retry_for=0) as c:
        assert c.health()["restarts"] == 1
        with pytest.raises(FrontError):
            c.request("generate", prompt="x", max_new_tokens=0)
    assert cli("down").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID={rec['job_id']}") == []
