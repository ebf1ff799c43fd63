"""The router process in front of replica leaders that dial it (handler replicas: fast, and slow
enough per batch to catch work in flight): the key is proved both ways, load spreads, a replica
killed mid-request loses nothing, drain stops new work, and with no replica requests wait."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import FrontError
from dslaunch.serving import link
from dslaunch.serving.ndjson import PING_LIMIT_S
from dslaunch.wire.serve import ServeSpec
from tests.routerkit import Kit

SERVE = ServeSpec(handler="tests.routerkit:Echo", max_batch_size=2, batch_wait_ms=0, max_request_bytes=4096)
DELAY = 0.3


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    """A router of its own with no replica yet, for a test that decides how they come."""
    k = Kit(tmp_path, SERVE, replicas=2)
    try:
        k.start_router()
        yield k
    finally:
        k.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    """One router and its two slowed replicas for the tests that leave them as they found them."""
    k = Kit(tmp_path_factory.mktemp("router"), SERVE, replicas=2)
    try:
        k.start_router()
        yield k
    finally:
        k.close()


@pytest.fixture
def both(shared: Kit) -> Kit:
    """The shared kit with both replicas up and ready (started again where a test ended one)."""
    for r in (0, 1):
        p = shared.procs.get(r)
        if p is None or p.poll() is not None:
            shared.procs.pop(r, None)
            shared.start_replica(r, delay=DELAY)
        shared.wait_state(r, "ready")
    return shared


def _infer_all(kit: Kit, inputs: list[Any]) -> list[Any]:
    """One client per input, all at once; each answer, or the FrontError it raised."""
    out: list[Any] = [None] * len(inputs)

    def one(i: int) -> None:
        try:
            with kit.client() as c:
                out[i] = c.infer(inputs[i])
        except FrontError as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_the_link_refuses_a_wrong_key_both_ways(kit: Kit) -> None:
    # a leader with the wrong key is refused by the router, and keeps redialling (no link)
    kit.start_replica(0, key="not-the-key-0123456789abcdef")
    kit.start_replica(1)
    log = kit.work / kit.job / "node0" / "replica.log"
    kit.until(lambda: "wrong replica key" in log.read_text())
    assert kit.replica(0)["state"] == "connecting" and kit.replica(1)["state"] == "ready"

    async def leader_with(key: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", kit.link_port)
        try:
            hello = {"replica": 0, "attempt": 0, "ranks": 1, "model": "m", "task": "custom", "max_batch_size": 2}
            await link.offer(reader, writer, key, hello)
        finally:
            writer.close()

    with pytest.raises(link.LinkRefused, match="wrong replica key"):
        asyncio.run(leader_with("wrong-key-0123456789abcdef"))

    # a "router" that does not know the key: the leader refuses it (its proof is checked too)
    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"challenge": "0123456789abcdef0123"}\n')
        await reader.readline()
        writer.write(json.dumps({"proof": "00" * 32}).encode() + b"\n")
        await writer.drain()

    async def dial_impostor() -> None:
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await link.offer(reader, writer, kit.key, {"replica": 0})
        finally:
            writer.close()
            server.close()

    with pytest.raises(link.LinkRefused, match="did not prove"):
        asyncio.run(dial_impostor())


def test_two_replicas_share_concurrent_load_and_answer_alike(both: Kit) -> None:
    kit = both
    inputs = [{"n": i} for i in range(12)]
    assert _infer_all(kit, inputs) == [{"echo": x} for x in inputs]
    with kit.client() as c:
        assert c.infer([1, 2]) == [{"echo": 1}, {"echo": 2}]
        big = "x" * (4096 - 40)  # the client's line fits; forwarded, it spells out more (a list, a timeout)
        assert c.infer(big) == {"echo": big}
        stats = c.stats()
        deep = c.health(deep=True)
    assert all(r["served"] > 0 for r in stats["replicas"]), stats["replicas"]
    # the engines' counters come from the replicas themselves, summed: every batch they ran
    batches = [r["engine"]["batches"] for r in stats["replicas"]]
    assert all(b > 0 for b in batches) and stats["batches"] == sum(batches)
    assert stats["forward_passes"] == sum(r["engine"]["forward_passes"] for r in stats["replicas"])
    assert stats["batch_size"]["mean"] > 0
    assert deep["status"] == "ready" and deep["world_size"] == 2 and deep["ranks_ready"] == 2
    assert [r["rank"] for r in deep["ranks"]] == [0]
    status = json.loads(kit.router_dir.front_status.read_text())
    assert [r["id"] for r in status["replicas"]] == [0, 1] and status["router"] is True


def _while_replica_0_holds(kit: Kit, rows: int, act: Any) -> list[Any]:
    """Ten requests from ten clients over the two slowed replicas; `act` once replica 0 holds more
    than `rows` rows of them. Returns every answer."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(_infer_all(kit, [{"n": i} for i in range(10)])))
    t.start()
    kit.until(lambda: kit.replica(0)["in_flight"] > rows)
    act()
    t.join(180)
    return box[0]


def test_a_replica_killed_mid_request_loses_nothing_and_rejoins(both: Kit) -> None:
    kit = both
    inputs = [{"n": i} for i in range(10)]
    restarts = kit.health()["restarts"]
    answers = _while_replica_0_holds(kit, 0, lambda: kit.kill_replica(0))
    assert answers == [{"echo": x} for x in inputs], "every request was re-run on the other replica"
    assert kit.replica(0)["state"] == "down"
    kit.start_replica(0, delay=DELAY)  # its gang restarted: a new attempt dials in
    health = kit.health()
    assert health["restarts"] == restarts + 1 and [r["state"] for r in health["replicas"]] == ["ready", "ready"]
    assert _infer_all(kit, inputs[:4]) == [{"echo": x} for x in inputs[:4]]


def test_a_silent_replica_is_dropped_after_the_ping_limit_and_links_again(both: Kit) -> None:
    """SIGSTOP: the leader's socket stays open and its kernel still acknowledges, as on a host that
    hangs or drops off the network; only the router's unanswered pings can tell."""
    kit = both
    pid = kit.procs[0].pid
    try:
        answers = _while_replica_0_holds(kit, 0, lambda: os.kill(pid, signal.SIGSTOP))
        assert answers == [{"echo": {"n": i}} for i in range(10)], "its work was re-run on the other replica"
        assert kit.replica(0)["state"] == "down"
        assert f"replica 0 down: no answer to pings for {PING_LIMIT_S:g}s" in kit.router_log()
    finally:
        os.kill(pid, signal.SIGCONT)
    kit.wait_state(0, "ready")  # the same process: it finds its old link closed and dials again
    assert kit.procs[0].poll() is None


def test_a_replica_stopping_gracefully_hands_its_queue_back(both: Kit) -> None:
    """SIGTERM: the leader answers what it had queued with `unavailable`; the router re-runs it."""
    kit = both
    answers = _while_replica_0_holds(kit, SERVE.max_batch_size, lambda: kit.procs[0].terminate())  # some queued
    assert answers == [{"echo": {"n": i}} for i in range(10)]
    assert kit.stopped(0) == 0


def test_drain_stops_new_work_to_a_replica(both: Kit) -> None:
    kit = both
    kit.router_dir.drain.write_text("[1]")
    kit.wait_state(1, "draining")
    before = kit.replica(1)["served"]
    assert _infer_all(kit, list(range(6))) == [{"echo": i} for i in range(6)]
    assert kit.replica(1)["served"] == before
    kit.router_dir.drain.write_text("[]")
    kit.wait_state(1, "ready")


def test_with_no_replica_requests_wait_then_run_or_time_out(kit: Kit) -> None:
    with kit.client() as c:
        assert c.health()["status"] == "starting"
        with pytest.raises(FrontError) as e:
            c.request("infer", input=1, timeout=0.5)
        assert e.value.code == "timeout"
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(_infer_all(kit, [7])))
    t.start()
    kit.until(lambda: kit.health()["queue"] == 1)
    kit.start_replica(1)
    t.join(120)
    assert box == [[{"echo": 7}]]


def test_a_token_guards_the_router_and_sigterm_answers_the_queue(tmp_path: Path) -> None:
    kit = Kit(tmp_path, SERVE, replicas=1)
    for path, value in ((kit.router_dir.front_token, "router-token-0123456789"), (kit.router_dir.front_nonce, "n0")):
        path.write_text(value)
        path.chmod(0o600)
    try:
        router = kit.start_router()
        with kit.client() as c, pytest.raises(FrontError) as e:
            c.health()
        assert e.value.code == "unauthorized"
        box: list[Any] = []

        def waiting() -> None:
            try:
                with kit.client(token="router-token-0123456789", nonce="n0") as c:
                    box.append(c.infer(1))
            except FrontError as err:
                box.append(err)

        t = threading.Thread(target=waiting)
        t.start()
        with kit.client(token="router-token-0123456789") as c:
            kit.until(lambda: c.health()["queue"] == 1)
        router.terminate()
        assert router.wait(30) == 0
        t.join(30)
        assert isinstance(box[0], FrontError) and box[0].code == "unavailable"
    finally:
        kit.close()


def test_a_router_whose_port_is_taken_says_so_and_exits(shared: Kit) -> None:
    kit = shared
    second = Kit(kit.work, SERVE, replicas=1)
    second.serve = kit.serve  # the same public port, still held by the first router
    try:
        p = second.start_router(wait=False)
        assert p.wait(60) != 0
        log = (second.router_dir.root / "router.log").read_text()
        assert f"cannot listen on 127.0.0.1:{kit.port}" in log and len(log.strip().splitlines()) == 1, log
    finally:
        second.close()


def test_a_restarted_router_gets_its_replicas_back_on_the_same_ports(both: Kit) -> None:
    kit = both
    assert kit.router is not None
    kit.router.kill()
    kit.router.wait(30)
    kit.router_dir.front_status.unlink()
    kit.start_router()  # same public and link ports, as its supervisor restarts it
    kit.wait_state(0, "ready", kit.attempts[0])  # the same leaders, not new attempts
    kit.wait_state(1, "ready", kit.attempts[1])
    assert _infer_all(kit, [1, 2, 3]) == [{"echo": 1}, {"echo": 2}, {"echo": 3}]


def test_a_newer_attempt_takes_the_replica_and_an_older_one_is_refused(both: Kit) -> None:
    kit = both
    old, was = kit.procs[0], kit.attempts[0]
    try:
        kit.start_replica(0, delay=DELAY)  # the next attempt while this one still runs (a gang on its way out)
        log = kit.work / kit.job / "node0" / "replica.log"
        refused = f"replica 0 is linked with attempt {was + 1}, after {was}"
        kit.until(lambda: refused in log.read_text())
        assert kit.replica(0)["attempt"] == was + 1 and kit.replica(0)["state"] == "ready"
        assert _infer_all(kit, [5]) == [{"echo": 5}]
    finally:
        old.kill()
        old.wait(30)
