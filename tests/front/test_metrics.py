"""/metrics on a live job, read with prometheus_client's own parser: the vLLM families (prefix
`dslaunch:`) carry vLLM's buckets, and their values follow a known load sent with the official
`openai` client (deltas: other tests share the job)."""

from __future__ import annotations

import urllib.request
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from dslaunch.serving.reqtimes import ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS
from tests.front.conftest import TOKEN

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(base_url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and each family's type."""
    url = base_url.removesuffix("/v1") + "/metrics"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    samples: Samples = {}
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def _get(samples: Samples, name: str, engine: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": "tiny", "engine": engine, **labels}.items())))
    return samples[key]


def _bounds(samples: Samples, name: str, engine: str) -> list[str]:
    out = []
    for (n, labels), _ in samples.items():
        lab = dict(labels)
        if n == name + "_bucket" and lab["engine"] == engine:
            out.append(lab["le"])
    return out


def test_vllm_metrics_follow_a_known_load(base_url: str) -> None:
    c = openai.OpenAI(base_url=base_url, api_key=TOKEN, timeout=120, max_retries=0)
    before, _ = _scrape(base_url)
    usage: list[tuple[int, int, str]] = []  # per row: prompt tokens, completion tokens, finish reason
    for prompt in ("Hello world", "The quick brown fox", "One"):
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))  # fmt: skip
        finish = next(ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason)
        u = chunks[-1].usage
        usage.append((u.prompt_tokens, u.completion_tokens, finish))
    both = c.completions.create(model="tiny", prompt=["Hello", "The quick"], max_tokens=4, temperature=0)
    for ch in both.choices:
        usage.append((-1, -1, ch.finish_reason))  # per-row usage is not split in the answer: summed below
    rows = len(usage)
    prompt_tokens = sum(p for p, _, _ in usage[:3]) + both.usage.prompt_tokens
    completion = sum(t for _, t, _ in usage[:3]) + both.usage.completion_tokens
    after, types = _scrape(base_url)

    def delta(name: str, engine: str = "all", **labels: str) -> float:
        return _get(after, name, engine, **labels) - _get(before, name, engine, **labels)

    for engine in ("0", "all"):  # one replica: it and the router's total agree
        assert delta("dslaunch:time_to_first_token_seconds_count", engine) == rows
        assert delta("dslaunch:e2e_request_latency_seconds_count", engine) == rows
        assert delta("dslaunch:request_queue_time_seconds_count", engine) == rows
        assert delta("dslaunch:prompt_tokens_total", engine) == prompt_tokens
        assert delta("dslaunch:generation_tokens_total", engine) == completion
        ended = sum(delta("dslaunch:request_success_total", engine, finished_reason=r) for r in ("stop", "length"))
        assert ended == rows
    # a gap per token after the first; a row that ends at eos has one step more than its tokens
    streams_gaps = sum(t if f == "stop" else t - 1 for _, t, f in usage[:3])
    assert delta("dslaunch:inter_token_latency_seconds_count") >= streams_gaps
    assert delta("dslaunch:inter_token_latency_seconds_count") == delta("dslaunch:time_per_output_token_seconds_count")
    assert delta("dslaunch:time_to_first_token_seconds_sum") > 0
    assert delta("dslaunch:e2e_request_latency_seconds_sum") >= delta("dslaunch:time_to_first_token_seconds_sum")

    # vLLM's bucket bounds, cumulative, +Inf equal to the count
    inf = ["+Inf"]
    assert _bounds(after, "dslaunch:time_to_first_token_seconds", "0") == [str(b) for b in TTFT_BUCKETS] + inf
    assert _bounds(after, "dslaunch:inter_token_latency_seconds", "0") == [str(b) for b in ITL_BUCKETS] + inf
    assert _bounds(after, "dslaunch:e2e_request_latency_seconds", "0") == [str(b) for b in REQUEST_BUCKETS] + inf
    ttft = [_get(after, "dslaunch:time_to_first_token_seconds_bucket", "all", le=le)
            for le in _bounds(after, "dslaunch:time_to_first_token_seconds", "all")]  # fmt: skip
    assert ttft == sorted(ttft) and ttft[-1] == _get(after, "dslaunch:time_to_first_token_seconds_count", "all")

    kinds = {"dslaunch:time_to_first_token_seconds": "histogram", "dslaunch:num_requests_running": "gauge",
             "dslaunch:num_requests_waiting": "gauge", "dslaunch:prefix_cache_queries": "counter",
             "dslaunch:prefix_cache_hits": "counter", "dslaunch:prompt_tokens": "counter",
             "dslaunch:request_queue_time_seconds": "histogram", "dslaunch_requests": "counter"}  # fmt: skip
    assert {k: types.get(k) for k in kinds} == kinds
    # idle now: nothing running or waiting, every block of the paged pool free again; the prefix
    # cache was asked about every full block of the prompts (in tokens, as vLLM counts them)
    assert _get(after, "dslaunch:num_requests_running", "all") == 0
    assert _get(after, "dslaunch:num_requests_waiting", "all") == 0
    assert _get(after, "dslaunch:kv_cache_usage_perc", "0") == 0
    queried = delta("dslaunch:prefix_cache_queries_total", "0")
    assert queried >= 0 and queried % 16 == 0 and delta("dslaunch:prefix_cache_hits_total", "0") <= queried
    front_ok = ("dslaunch_requests_total", (("op", "completions"), ("outcome", "ok"), ("protocol", "http")))
    assert after[front_ok] - before.get(front_ok, 0) == 4


def test_engine_totals_add_replicas_and_the_router_queue() -> None:
    """The router's `all`: replicas' histograms and counters added, its own queue counted as waiting."""
    from dslaunch.serving.metrics import engine_families
    from dslaunch.serving.reqtimes import RequestTimes
    from dslaunch.serving.router import engines_total

    docs: list[dict[str, Any]] = []
    for i in range(2):
        t = RequestTimes()
        t.step([0.003] * (i + 1), [0.02, 0.2], 10, 3)
        t.ended("length", 1.2, 0.001)
        docs.append({"in_flight": i + 1, "queue": 1, "request_times": t.doc(), "kv_blocks_used": 3 * i,
                     "kv_blocks_total": 8, "prefix_cache_queries": 5, "prefix_cache_hits": i})  # fmt: skip
    total = engines_total(docs, queued_here=4)
    fams = {f.name: f for f in engine_families([("0", docs[0]), ("1", docs[1]), ("all", total)], "m")}
    value = lambda fam, sample, engine, **lab: next(  # noqa: E731
        s.value for s in fams[fam].samples if s.name == sample and s.labels["engine"] == engine
        and all(s.labels.get(k) == v for k, v in lab.items()))  # fmt: skip
    assert value("dslaunch:num_requests_waiting", "dslaunch:num_requests_waiting", "all") == 6
    assert value("dslaunch:num_requests_running", "dslaunch:num_requests_running", "all") == 3
    assert value("dslaunch:kv_cache_usage_perc", "dslaunch:kv_cache_usage_perc", "1") == 3 / 8
    assert value("dslaunch:kv_cache_usage_perc", "dslaunch:kv_cache_usage_perc", "all") == 3 / 16
    assert value("dslaunch:prefix_cache_hits", "dslaunch:prefix_cache_hits_total", "all") == 1
    ttft = "dslaunch:time_to_first_token_seconds"
    assert value(ttft, ttft + "_count", "all") == 3
    assert value(ttft, ttft + "_bucket", "all", le="0.005") == 3
    assert value(ttft, ttft + "_bucket", "all", le="0.001") == 0
    itl = "dslaunch:inter_token_latency_seconds"
    assert value(itl, itl + "_bucket", "all", le="0.025") == 2
    assert value(itl, itl + "_count", "all") == 4
    assert value("dslaunch:request_success", "dslaunch:request_success_total", "all", finished_reason="length") == 2
