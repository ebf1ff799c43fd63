"""`dslaunch logs`: the ranks' log lines from every node, read once or followed."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from dslaunch.launch.records import cluster_for
from dslaunch.wire.records import JobRecord


def _ranks_on(rec: JobRecord, ranks: list[int] | None) -> list[int]:
    """Indices of the agents that hold any of the wanted ranks (the router holds none)."""
    agents = [i for i, n in enumerate(rec.nodes) if n.kind == "agent"]
    if ranks is None:
        return agents
    return [i for i in agents if _local(rec, i, ranks)]


def _local(rec: JobRecord, i: int, ranks: list[int] | None) -> list[int] | None:
    """The wanted ranks as agent `i` numbers them (inside its replica); None: all of them."""
    n = rec.nodes[i]
    if ranks is None:
        return None
    return [r - n.rank_offset + n.gang_offset for r in ranks if n.rank_offset <= r < n.rank_offset + n.nprocs]


def _global(rec: JobRecord, i: int, rank: int) -> int:
    n = rec.nodes[i]
    return rank + n.rank_offset - n.gang_offset


def read_logs(rec: JobRecord, ranks: list[int] | None, lines: int) -> tuple[dict[int, list[str]], list[str]]:
    """The last `lines` lines of each wanted rank's log, and one error line per unreachable node."""
    out: dict[int, list[str]] = {}
    errors: list[str] = []
    with cluster_for(rec) as cluster:
        want = _ranks_on(rec, ranks)
        clients = [cluster.clients[i] for i in want]
        results = cluster.map(
            lambda c: c.call("logs", {"node_dir": rec.nodes[cluster.clients.index(c)].node_dir,
                                      "ranks": _local(rec, cluster.clients.index(c), ranks), "lines": lines}),
            clients,
        )  # fmt: skip
        for i, r in zip(want, results, strict=True):
            if not r.ok:
                errors.append(str(r.error))
                continue
            for k, v in (r.value or {}).get("logs", {}).items():
                out[_global(rec, i, int(k))] = v
    return dict(sorted(out.items())), errors


def router_log(rec: JobRecord, lines: int) -> list[str]:
    """The last lines each router (and its supervisor) wrote: links, replicas up and down, refusals.
    With several routers each line says which (`router K:`); a router whose node does not answer
    gets one line saying so."""
    routers = [i for i, n in enumerate(rec.nodes) if n.kind == "router"]
    if not routers:
        return []
    with cluster_for(rec) as cluster:
        args = {i: {"node_dir": rec.nodes[i].node_dir, "agent": True, "lines": lines} for i in routers}
        results = cluster.map(lambda c: c.call("logs", args[cluster.clients.index(c)]),
                              [cluster.clients[i] for i in routers])  # fmt: skip
    out: list[str] = []
    for k, r in enumerate(results):
        tag = f"router {k}: " if len(routers) > 1 else ""
        if not r.ok:
            out.append(f"{tag}{r.error}")
            continue
        out += [tag + line for line in (r.value or {}).get("agent", [])]
    return out


def follow_logs(rec: JobRecord, ranks: list[int] | None) -> Iterator[tuple[int, str]]:
    """(rank, line) as lines are written on any node, until the caller stops iterating."""
    q: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=10000)
    cluster = cluster_for(rec)
    want = _ranks_on(rec, ranks)
    stop = threading.Event()

    def pump(i: int) -> None:
        c = cluster.clients[i]
        try:
            for line in c.stream("follow", {"node_dir": rec.nodes[i].node_dir, "ranks": _local(rec, i, ranks)}):
                rank, _, text = line.partition("\t")
                if stop.is_set():
                    break
                if rank.isdigit():
                    q.put((_global(rec, i, int(rank)), text))
            else:
                if not stop.is_set():  # the node's stream ended by itself: say so, never end silently
                    q.put((-1, f"{rec.nodes[i].host}: the log stream ended (node unreachable or rebooted?)"))
        except Exception as e:
            q.put((-1, f"{rec.nodes[i].host}: {e}"))
        finally:
            q.put(None)

    threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in want]
    for t in threads:
        t.start()
    open_streams = len(threads)
    try:
        while open_streams:
            item = q.get()
            if item is None:
                open_streams -= 1
                continue
            yield item
    finally:
        stop.set()
        cluster.close()
        deadline = time.monotonic() + 3
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
