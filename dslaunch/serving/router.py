"""The router: the job's public front in its own process on node 0, in front of R replicas.

    python -m dslaunch.serving.router      (environment: RouterEnv; files: its NodeDir)

It owns the public port (NDJSON and HTTP, auth, limits, the queue: the Front, unchanged) and
hands the work to replica leaders over their links (`serving.dispatch`), which they dial in on
`link_bind:link_port`. Prompts are checked (tokenized) where they run, on the replica; the router
keeps its own tokenizer only for the OpenAI routes' chat template and token counts, loaded when
one first needs it (and retried: the ranks build the built-in model on their first load).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dslaunch.serving.batcher import STOPPING
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.dispatch import Dispatcher
from dslaunch.serving.front import Front
from dslaunch.serving.reqtimes import merge as merge_times
from dslaunch.serving.stats import CACHE_FIELDS, Stats
from dslaunch.wire import held
from dslaunch.wire import protocol as P
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.protocol import ProtocolError
from dslaunch.wire.routerenv import RouterEnv
from dslaunch.wire.serve import ServeSpec
from dslaunch.wire.states import LINKED, front_state

STOP_WAIT_S = 8.0  # after SIGTERM, how long requests already on a replica may take to finish
TEXT_RETRY_S = 5.0
TEXT_WAIT_S = 30.0  # an OpenAI chat or embeddings request waits this long for the router's tokenizer


class RouterFront(Front):
    """The Front with a dispatcher for a batcher: health, stats and status answer per replica."""

    batcher: Dispatcher

    def health(self) -> dict[str, Any]:
        reps = self.batcher.rows()
        linked = [r for r in reps if r["state"] in LINKED]
        status = front_state(self.accepting, [r["state"] for r in reps])
        return {
            "status": status,
            "world_size": self.info["world_size"],
            "ranks_ready": sum(r["ranks"] for r in linked),
            "restarts": sum(r["attempt"] for r in reps),
            "model": self.info.get("model"),
            "task": self.info.get("task"),
            "queue": self.batcher.depth,
            "uptime_s": round(time.time() - self.stats.started, 1),
            "replicas": reps,
        }

    def stats_doc(self) -> dict[str, Any]:
        return {**super().stats_doc(), "replicas": self.batcher.rows()}

    async def stats_now(self) -> dict[str, Any]:
        """The router's own counters (requests, latency) with the engines' summed over replicas."""
        doc = self.stats_doc()
        engines = await self.batcher.ask_all("stats")
        for row in doc["replicas"]:
            row["engine"] = (engines.get(row["id"]) or {}).get("stats")
        doc.update(merge_engines([e["stats"] for e in engines.values() if isinstance(e.get("stats"), dict)]))
        return doc

    def status_doc(self) -> dict[str, Any]:
        return {**super().status_doc(), "router": True, "replicas": self.batcher.rows()}

    async def engine_docs(self) -> list[tuple[str, dict[str, Any]]]:
        """Each linked replica's engine stats (the slow and the down left out), and their sum as
        `all`, whose waiting requests include the router's own queue."""
        got = await self.batcher.ask_all("stats")
        docs = [(str(rid), a["stats"]) for rid, a in sorted(got.items()) if isinstance(a.get("stats"), dict)]
        return [*docs, ("all", engines_total([d for _, d in docs], self.batcher.depth))]


def merge_engines(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The replicas' engine counters as one engine's: sums, and means weighted by their counts."""
    if not stats:
        return {}
    total = lambda key: sum(float(s.get(key) or 0) for s in stats)  # noqa: E731
    steps, batches = total("steps"), total("batches")
    step_rows = sum(s["rows_per_step"]["mean"] * s.get("steps", 0) for s in stats)
    batch_rows = sum(s["batch_size"]["mean"] * s.get("batches", 0) for s in stats)
    out = {
        "steps": int(steps), "batches": int(batches), "tokens_generated": int(total("tokens_generated")),
        "forward_passes": int(total("forward_passes")),
        "engine_busy_s": round(total("engine_busy_s"), 4), "tokens_per_s": round(total("tokens_per_s"), 1),
        "rows_per_step": {"mean": round(step_rows / steps, 3) if steps else 0.0,
                          "max": max(s["rows_per_step"]["max"] for s in stats)},
        "batch_size": {"mean": round(batch_rows / batches, 3) if batches else 0.0,
                       "max": max(s["batch_size"]["max"] for s in stats)},
    }  # fmt: skip
    paged = [s for s in stats if "kv_blocks_total" in s]
    if paged:
        out.update({k: int(sum(s.get(k) or 0 for s in paged)) for k in (*CACHE_FIELDS, "preemptions", "steps_capped")})
    paths = sorted({str(s["kv_cache"]) for s in stats if s.get("kv_cache")})
    if paths:
        out["kv_cache"] = ",".join(paths)
    return out


def engines_total(docs: list[dict[str, Any]], queued_here: int) -> dict[str, Any]:
    """The replicas' engine stats as one engine's for the metrics: gauges and counters summed."""
    out: dict[str, Any] = {"in_flight": sum(int(d.get("in_flight") or 0) for d in docs),
                           "queue": queued_here + sum(int(d.get("queue") or 0) for d in docs),
                           "request_times": merge_times([d.get("request_times") or {} for d in docs])}  # fmt: skip
    for key in CACHE_FIELDS:
        have = [d[key] for d in docs if isinstance(d.get(key), (int, float))]
        if have:
            out[key] = sum(have)
    return out


class Loading:
    """Stands for the tokenizer until it is loaded: the OpenAI routes that need it wait for it (off
    the event loop, bounded), then say `unavailable` if it is still not there."""

    def __init__(self, start: Any = None, wait_s: float = TEXT_WAIT_S) -> None:
        self.loaded = threading.Event()
        self.tools: Any = None
        self.start = start  # begins the load (once): on first use, so jobs that never ask pay nothing
        self.wait_s = wait_s

    def precheck(self, req: Any) -> None:
        pass

    def _tools(self) -> Any:
        if self.start is not None:
            self.start(None)
        if not self.loaded.wait(self.wait_s):
            raise ProtocolError(P.UNAVAILABLE, "the router is still loading the model's tokenizer; retry")
        return self.tools

    def chat(self, messages: Any, tools: Any = None) -> str:
        return str(self._tools().chat(messages, tools))

    def count(self, texts: list[str]) -> int:
        return int(self._tools().count(texts))

    def __getattr__(self, name: str) -> Any:
        """The rest of TextTools (tokenize, detokenize, max_positions ...), once it is loaded."""
        if name in ("tokenize", "detokenize", "token_strs", "max_positions", "vocab_size"):
            return getattr(self._tools(), name)
        raise AttributeError(name)


class TextLoader:
    """The router's tokenizer (OpenAI routes), loaded in a thread when first needed (transformers
    costs seconds of CPU and a few hundred MB: most jobs never need it here)."""

    def __init__(self, serve: ServeSpec, models: Path) -> None:
        self.serve = serve
        self.path = serve.model or str(models / _tiny_name())
        self.front: Front | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def __call__(self, _hello: dict[str, Any] | None) -> None:
        with self.lock:
            if self.thread is None and isinstance(self.front.text if self.front else None, Loading):
                self.thread = threading.Thread(target=self._load, name="dslaunch-tokenizer", daemon=True)
                self.thread.start()

    def _load(self) -> None:
        """Until it works: a replica on another node may have built the built-in model first."""
        from dslaunch.serving.openai_api import TextTools

        said = ""
        while True:
            try:
                from transformers import AutoConfig, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.path)
                positions = None
                if self.serve.task == "generate":
                    config = AutoConfig.from_pretrained(self.path)
                    positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
                assert self.front is not None
                tools, waiting = TextTools(tok, threading.Lock(), positions), self.front.text
                self.front.text = tools
                if isinstance(waiting, Loading):  # requests already waiting for it go on
                    waiting.tools = tools
                    waiting.loaded.set()
                return
            except Exception as e:
                why = f"cannot load the tokenizer of {self.path} yet ({type(e).__name__}: {e}); retrying"[:400]
                if why != said:
                    print(why, flush=True)
                    said = why
                time.sleep(TEXT_RETRY_S)


def _tiny_name() -> str:
    from dslaunch.engine.tinymodel import NAME

    return NAME


def _secret(path: Path) -> str | None:
    return (path.read_text().strip() or None) if path.exists() else None


def build(env: RouterEnv, nd: NodeDir) -> tuple[RouterFront, Dispatcher]:
    """The router's Front and dispatcher, configured from RouterEnv and its directory's files."""
    serve = env.serve
    key = _secret(nd.replica_secret)
    if key is None:
        raise SystemExit(f"router: no replica key in {nd.replica_secret}")
    task = "custom" if serve.handler else serve.task
    model = serve.handler or serve.model or str(nd.models / _tiny_name())
    cfg = FrontConfig.from_serve(serve, _secret(nd.front_token), _secret(nd.front_nonce), Path(model).name)
    text = TextLoader(serve, nd.models)
    disp = Dispatcher(cfg, key, env.replicas, task, nd.drain)
    info = {"world_size": env.world_size, "ranks": [], "restarts": 0, "model": model, "task": task}
    front = RouterFront(cfg, info, None, disp, Stats(), nd.front_status)  # type: ignore[arg-type]
    text.front = front
    if not serve.handler:
        front.text = Loading(start=text)
    return front, disp


def main() -> int:
    env = RouterEnv.from_env()
    nd = NodeDir.at(env.node_dir)
    front, disp = build(env, nd)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        front.start()
        assert front.loop is not None
        try:
            asyncio.run_coroutine_threadsafe(disp.listen(env.link_bind, env.link_port), front.loop).result(30)
        except OSError as e:
            raise OSError(f"cannot listen for replica links on {env.link_bind}:{env.link_port}: {e}") from e
    except Exception as e:  # the port is taken (after the retries), or the address is wrong
        print(f"router: {e}", file=sys.stderr, flush=True)
        front.close()
        return 1
    print(f"router serving on {front.address}; replicas dial {env.link_bind}:{env.link_port}", flush=True)
    ready = os.environ.get(held.READY_ENV)
    if ready:  # its supervisor resets its back-off for a router that got this far
        with contextlib.suppress(OSError):
            Path(ready).touch()
    stop.wait()
    print("router stopping", flush=True)
    front.stop_accepting(STOPPING)
    deadline = time.monotonic() + STOP_WAIT_S
    while disp.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(disp.shut(), front.loop).result(2)  # type: ignore[arg-type]
    front.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
