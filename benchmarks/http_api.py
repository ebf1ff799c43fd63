"""HTTP (OpenAI-compatible) vs NDJSON on the same front: added latency and throughput.

One `dslaunch up` job on localhost (the built-in tiny model, 2 ranks). Latency: a 1-token greedy
request, NDJSON (dslaunch's client) and HTTP (`POST /v1/completions` over a keep-alive
connection, by an equally small raw-socket client) interleaved, p50 and p90 of each and the difference. Throughput: 16
closed-loop clients, each on its own connection, 32 new tokens per request, for --seconds each
protocol; the ratio of HTTP's tokens/s to NDJSON's.

    python benchmarks/http_api.py [--seconds 10] [--samples 300] [--rounds 4] [--out benchmarks/results/http_api.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

from common import dslaunch, table, write

from dslaunch.client import Client

PROMPT = "The quick brown fox jumps over the lazy dog"
CLIENTS = 16
NEW_TOKENS = 32


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Http:
    """A minimal keep-alive HTTP/1.1 client on a raw socket, as light as dslaunch's NDJSON client:
    the comparison is of the protocols and the front, not of a client library's own parsing."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.buf = b""

    def complete(self, max_tokens: int) -> int:
        body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        size = int(match.group(1)) if match else 0
        while len(rest) < size:
            rest += self._recv()
        data, self.buf = json.loads(rest[:size]), rest[size:]
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(data)
        return int(data["usage"]["completion_tokens"])

    def health(self) -> None:
        self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        size = int(match.group(1)) if match else 0
        while len(rest) < size:
            rest += self._recv()
        self.buf = rest[size:]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the front closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def latency(port: int, samples: int) -> dict[str, float]:
    nd_t: list[float] = []
    http_t: list[float] = []
    h = Http(port)
    with Client("127.0.0.1", port, timeout=300) as c:
        for _ in range(20):  # warm-up
            c.generate(PROMPT, max_new_tokens=1)
            h.complete(1)
        for i in range(samples):  # alternating which goes first, so neither always follows the other
            for proto in ("ndjson", "http") if i % 2 else ("http", "ndjson"):
                t = time.perf_counter()
                if proto == "ndjson":
                    c.generate(PROMPT, max_new_tokens=1)
                    nd_t.append(time.perf_counter() - t)
                else:
                    h.complete(1)
                    http_t.append(time.perf_counter() - t)
        nd_h: list[float] = []
        http_h: list[float] = []
        for _ in range(samples):  # the front alone: health never reaches the engine
            t = time.perf_counter()
            c.health()
            nd_h.append(time.perf_counter() - t)
            t = time.perf_counter()
            h.health()
            http_h.append(time.perf_counter() - t)
    h.close()
    out = {"ndjson_p50_ms": _pct(nd_t, 0.5) * 1e3, "http_p50_ms": _pct(http_t, 0.5) * 1e3,
           "ndjson_p90_ms": _pct(nd_t, 0.9) * 1e3, "http_p90_ms": _pct(http_t, 0.9) * 1e3,
           "ndjson_health_p50_ms": _pct(nd_h, 0.5) * 1e3, "http_health_p50_ms": _pct(http_h, 0.5) * 1e3}  # fmt: skip
    out["added_p50_ms"] = out["http_p50_ms"] - out["ndjson_p50_ms"]
    return out


def throughput(port: int, proto: str, seconds: float) -> dict[str, float]:
    tokens = [0]
    count = [0]
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS + 1)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            if proto == "ndjson":
                c = Client("127.0.0.1", port, retry_for=0, timeout=300)
                call = lambda: c.generate(PROMPT, max_new_tokens=NEW_TOKENS)["tokens"]  # noqa: E731
            else:
                h = Http(port)
                call = lambda: h.complete(NEW_TOKENS)  # noqa: E731
            call()
            start.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                n = call()
                with lock:
                    tokens[0] += n
                    count[0] += 1
        except BaseException as e:  # a benchmark with failed requests is void
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=one) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a {proto} client failed: {errors[0]!r}")
    return {"tokens_per_s": tokens[0] / wall, "requests_per_s": count[0] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="Measuring time per protocol and round.")
    ap.add_argument("--samples", type=int, default=300, help="1-token requests per protocol.")
    ap.add_argument("--rounds", type=int, default=4, help="Throughput rounds (protocols alternate).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-http-") as tmp_s:
        tmp = Path(tmp_s)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSLAUNCH_")}
        env["DSLAUNCH_HOME"] = str(tmp / "home")
        (tmp / "work").mkdir()
        up = dslaunch(env, "up", "-H", "hostfiles/localhost", "--work-dir", str(tmp / "work"),
                      "--max-batch-size", "16", "--batch-wait-ms", "0", "--max-inflight", "16")  # fmt: skip
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        try:
            rec = json.loads((tmp / "home" / "jobs" / "default.json").read_text())
            port = int(rec["extra"]["front"]["port"])
            lat = latency(port, args.samples)
            runs: dict[str, list[float]] = {"ndjson": [], "http": []}
            for _ in range(args.rounds):
                for proto in ("ndjson", "http"):
                    runs[proto].append(throughput(port, proto, args.seconds)["tokens_per_s"])
        finally:
            dslaunch(env, "down", "--grace", "5")
    thr = {p: sum(v) / len(v) for p, v in runs.items()}
    ratio = thr["http"] / thr["ndjson"]
    rows = [[f"1-token generate {q}", lat[f"ndjson_{q}_ms"], lat[f"http_{q}_ms"],
             lat[f"http_{q}_ms"] - lat[f"ndjson_{q}_ms"]] for q in ("p50", "p90")]  # fmt: skip
    rows.append(["health p50 (front only)", lat["ndjson_health_p50_ms"], lat["http_health_p50_ms"],
                 lat["http_health_p50_ms"] - lat["ndjson_health_p50_ms"]])  # fmt: skip
    print(table(["request", "NDJSON ms", "HTTP ms", "HTTP added ms"], rows))
    print()
    print(table([f"{CLIENTS} clients, {NEW_TOKENS} tokens", "NDJSON tok/s", "HTTP tok/s", "HTTP / NDJSON"],
                [["mean of rounds", thr["ndjson"], thr["http"], ratio]]))  # fmt: skip
    setup = (
        f"localhost, 2 ranks (gloo), built-in tiny model, greedy; latency: {args.samples} interleaved 1-token "
        f"requests; throughput: {CLIENTS} closed-loop clients x {args.seconds:g}s x {args.rounds} rounds"
    )
    write("http_api", {"setup": setup, "latency": lat, "throughput": {"runs": runs, "mean": thr, "ratio": ratio}},
          args.out)  # fmt: skip


if __name__ == "__main__":
    main()
