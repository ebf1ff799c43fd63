"""`GET /metrics`: the front's counters and the engines' request metrics, through prometheus_client.

Two sets of families:

- `dslaunch_*`: the front's own (requests by protocol, route and outcome, their latency,
  connections, the queue, restarts);
- `dslaunch:*`: the engines', with vLLM's names, semantics and buckets (`vllm:` becomes
  `dslaunch:`), labelled `model_name` and `engine` as vLLM labels them. `engine` is the replica's
  id; the router adds the sum of its replicas as `engine="all"` (its waiting requests include
  the router's own queue). README.md lists each with its vLLM counterpart.

The values are kept as plain numbers where they are counted (`Metrics` here, on the front's
thread; `serving.reqtimes` on rank 0's loop) and turned into families when scraped, by a
collector of this scrape's numbers in a registry of its own: nothing is global to the process.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from dslaunch.serving.reqtimes import HISTOGRAMS

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
V = "dslaunch:"  # vLLM's prefix, `vllm:`, changed
# (name, our histogram, help): vLLM emits time_per_output_token_seconds beside its newer name
# inter_token_latency_seconds, with the same observations; so does this
ENGINE_HISTOGRAMS = (
    ("time_to_first_token_seconds", "ttft", "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "itl", "Histogram of inter-token latency in seconds."),
    ("time_per_output_token_seconds", "itl", "Histogram of time per output token in seconds (the same "
     "observations as inter_token_latency_seconds, as vLLM keeps both)."),
    ("e2e_request_latency_seconds", "e2e", "Histogram of e2e request latency in seconds."),
    ("request_queue_time_seconds", "queue", "Histogram of time spent in WAITING phase for request."),
)  # fmt: skip


class Metrics:
    """Counters kept by the front's thread only (no lock needed): requests and latency."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (protocol, op or route, outcome)
        self.lat_counts: dict[str, list[int]] = {}
        self.lat_sum: Counter[str] = Counter()
        self.refused = 0
        self.prompt_tokens = 0

    def request(self, protocol: str, op: str, outcome: str) -> None:
        self.requests[(protocol, op, outcome)] += 1

    def latency(self, op: str, seconds: float) -> None:
        counts = self.lat_counts.setdefault(op, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.lat_sum[op] += seconds

    def render(self, snap: dict[str, Any], front: dict[str, Any], engines: list[tuple[str, dict[str, Any]]],
               model: str) -> bytes:  # fmt: skip
        """The exposition: `snap` is the front's Stats.snapshot(), `front` its live gauges,
        `engines` (engine label, that engine's stats) for the `dslaunch:` families."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Scrape(list(self._front(snap, front)) + list(engine_families(engines, model))))
        return generate_latest(registry)

    def _front(self, snap: dict[str, Any], front: dict[str, Any]) -> Iterator[Metric]:
        fam = CounterMetricFamily("dslaunch_requests", "Requests answered, by protocol, operation and outcome "
                                  "(ok or error code).", labels=["protocol", "op", "outcome"])  # fmt: skip
        for key, n in sorted(self.requests.items()):
            fam.add_metric(list(key), n)
        yield fam
        fam = CounterMetricFamily("dslaunch_errors", "Error answers by code.", labels=["code"])
        for code, n in sorted(snap["errors"].items()):
            fam.add_metric([code], n)
        yield fam
        hist = HistogramMetricFamily(
            "dslaunch_request_duration_seconds", "Time from queueing to the final answer, by operation.", labels=["op"]
        )
        for op, counts in sorted(self.lat_counts.items()):
            hist.add_metric([op], _buckets(LATENCY_BUCKETS, counts), self.lat_sum[op])
        yield hist
        sizes: dict[str, int] = snap["batch_size"]["histogram"]
        counts = [0] * (len(BATCH_BUCKETS) + 1)
        for size, n in sizes.items():
            counts[bisect.bisect_left(BATCH_BUCKETS, int(size))] += n
        hist = HistogramMetricFamily("dslaunch_batch_rows", "Rows (prompts) per batch run by the engine.")
        hist.add_metric([], _buckets(BATCH_BUCKETS, counts), sum(int(k) * n for k, n in sizes.items()))
        yield hist
        yield CounterMetricFamily("dslaunch_tokens_generated", "Tokens generated by the engine.",
                                  value=snap["tokens_generated"])  # fmt: skip
        yield CounterMetricFamily("dslaunch_prompt_tokens", "Prompt tokens of answered HTTP completions.",
                                  value=self.prompt_tokens)  # fmt: skip
        yield CounterMetricFamily("dslaunch_engine_busy_seconds", "Seconds the engine spent running batches.",
                                  value=snap["engine_busy_s"])  # fmt: skip
        yield GaugeMetricFamily("dslaunch_queue_depth", "Requests waiting for a batch.", value=snap["queue"])
        yield GaugeMetricFamily("dslaunch_in_flight_rows", "Rows in the batch the engine is running.",
                                value=snap["in_flight"])  # fmt: skip
        yield GaugeMetricFamily("dslaunch_connections", "Open client connections (NDJSON and HTTP).",
                                value=front["connections"])  # fmt: skip
        yield CounterMetricFamily("dslaunch_connections_refused", "Connections refused over --max-connections.",
                                  value=self.refused)  # fmt: skip
        yield GaugeMetricFamily("dslaunch_restarts", "Gang restarts of the job so far (this rank 0 is attempt "
                                "restarts+1).", value=front["restarts"])  # fmt: skip
        yield GaugeMetricFamily("dslaunch_ready", "1 while the front accepts work.", value=int(front["ready"]))
        yield GaugeMetricFamily("dslaunch_uptime_seconds", "Seconds since this front started.",
                                value=snap["uptime_s"])  # fmt: skip


def engine_families(engines: list[tuple[str, dict[str, Any]]], model: str) -> Iterator[Metric]:
    """The `dslaunch:` families (vLLM's), one series per engine label."""
    labels = ["model_name", "engine"]
    running = GaugeMetricFamily(V + "num_requests_running", "Number of requests in model execution batches.",
                                labels=labels)  # fmt: skip
    waiting = GaugeMetricFamily(V + "num_requests_waiting", "Number of requests waiting to be processed.",
                                labels=labels)  # fmt: skip
    kv = GaugeMetricFamily(V + "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels)
    queries = CounterMetricFamily(V + "prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                  "queried tokens.", labels=labels)  # fmt: skip
    hits = CounterMetricFamily(V + "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                               labels=labels)  # fmt: skip
    prompt = CounterMetricFamily(V + "prompt_tokens", "Number of prefill tokens processed.", labels=labels)
    generation = CounterMetricFamily(V + "generation_tokens", "Number of generation tokens processed.", labels=labels)
    success = CounterMetricFamily(V + "request_success", "Count of successfully processed requests.",
                                  labels=[*labels, "finished_reason"])  # fmt: skip
    hists = [HistogramMetricFamily(V + name, help_, labels=labels) for name, _, help_ in ENGINE_HISTOGRAMS]
    for engine, doc in engines:
        lab = [model, engine]
        times = doc.get("request_times") or {}
        running.add_metric(lab, float(doc.get("in_flight") or 0))
        waiting.add_metric(lab, float(doc.get("queue") or 0))
        used, total = doc.get("kv_blocks_used"), doc.get("kv_blocks_total")
        if isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0:
            kv.add_metric(lab, used / total)  # an engine without a block pool has no such gauge
        queries.add_metric(lab, float(doc.get("prefix_cache_queries") or 0))
        hits.add_metric(lab, float(doc.get("prefix_cache_hits") or 0))
        prompt.add_metric(lab, float(times.get("prompt_tokens") or 0))
        generation.add_metric(lab, float(times.get("generation_tokens") or 0))
        for reason in ("stop", "length", "abort"):
            success.add_metric([*lab, reason], float((times.get("finished") or {}).get(reason, 0)))
        for fam, (_, key, _) in zip(hists, ENGINE_HISTOGRAMS, strict=True):
            h = times.get(key) or {}
            bounds = HISTOGRAMS[key]
            counts = h.get("counts") or [0] * (len(bounds) + 1)
            fam.add_metric(lab, _buckets(bounds, counts), float(h.get("sum") or 0.0))
    yield from (running, waiting, kv, queries, hits, prompt, generation, success, *hists)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last above every bound) as Prometheus' cumulative `le` buckets."""
    out, running = [], 0
    for bound, n in zip(bounds, counts, strict=False):
        running += n
        out.append((floatToGoString(bound), running))
    out.append(("+Inf", running + (counts[-1] if len(counts) > len(bounds) else 0)))
    return out


class _Scrape:
    """A collector of one scrape's families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
