"""The OpenAI-compatible API on a live job, through the official `openai` client and curl, on the
same port as NDJSON: greedy text over HTTP is the NDJSON text, errors have the OpenAI shape."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import openai
import pytest

from dslaunch.client import Client
from tests.conftest import Cli
from tests.front.conftest import TOKEN

PROMPTS = ["Hello world", "The quick brown fox", "One command starts the job"]


def _oai(base_url: str, key: str = TOKEN, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=120, max_retries=retries)


def _ndjson(port: int, prompt: str, k: int) -> dict[str, Any]:
    with Client("127.0.0.1", port, token=TOKEN, timeout=120) as c:
        return c.generate(prompt, max_new_tokens=k)


def test_models_and_completions_match_ndjson(base_url: str, port: int) -> None:
    c = _oai(base_url)
    assert [m.id for m in c.models.list()] == ["tiny"]
    want = _ndjson(port, "Hello world", 12)
    r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == ("length" if want["finish_reason"] == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want["prompt_tokens"], want["tokens"])
    assert r.usage.total_tokens == want["prompt_tokens"] + want["tokens"]
    chunks = list(c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert len(chunks) >= 3
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want["tokens"]
    both = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [ch.text for ch in both.choices] == [_ndjson(port, p, 6)["text"] for p in PROMPTS[:2]]
    stop = want["text"][4:6]
    stopped = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == want["text"][: want["text"].index(stop)]
    a = c.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=5)
    b = c.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text, "the same seed samples the same text"


def test_chat_uses_the_template_streamed_and_not(base_url: str, port: int) -> None:
    c = _oai(base_url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = _ndjson(port, "system: Be brief.\nuser: Hello\nassistant:", 10)  # the tiny model's template
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = [ch for ch in stream if ch.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == want["prompt_tokens"]


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda c: c.completions.create(model="tiny", prompt="Hi", best_of=2), "best_of"),
        (lambda c: c.completions.create(model="tiny", prompt="Hi", suffix="!"), "suffix"),
        (
            lambda c: c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hi"}],
                functions=[{"name": "f"}],
            ),
            "functions",
        ),
        (lambda c: c.completions.create(model="tiny", prompt="Hi", max_tokens=0), "max_tokens"),
        (lambda c: c.embeddings.create(model="tiny", input="Hi"), None),  # a generate job
    ],
)
def test_unsupported_fields_get_a_400_naming_them(base_url: str, call: Any, param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        call(_oai(base_url))
    err = e.value.body
    assert err["code"] == "bad_request" and err["message"]
    assert err["param"] == param, err
    if param:
        assert repr(param) in err["message"]


def test_a_wrong_or_missing_key_is_401_and_an_unknown_model_404(base_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        _oai(base_url, key="not-the-token-at-all").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "unauthorized"
    with pytest.raises(openai.NotFoundError):
        _oai(base_url).completions.create(model="gpt-4", prompt="Hi")
    out = subprocess.run(["curl", "-sS", "-i", f"{base_url}/models"], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("HTTP/1.1 401") and "www-authenticate: bearer" in out.stdout.lower()


def test_overload_is_429_and_the_client_may_retry_it(base_url: str) -> None:
    results: list[Any] = []
    lock = threading.Lock()
    clients = [_oai(base_url) for _ in range(16)]  # built first: building one takes longer than a row
    go = threading.Barrier(len(clients))

    def one(client: openai.OpenAI) -> None:
        go.wait(60)  # all 16 at once, and none may end early: more than the queue can hold
        try:
            r: Any = client.completions.create(
                model="tiny", prompt="Hello", max_tokens=300, temperature=0, extra_body={"ignore_eos": True}
            )
        except openai.APIStatusError as e:
            r = e
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(results) == 16 and limited, "16 at once exceed 4 running + --max-queue 6"
    assert all(isinstance(r, openai.RateLimitError) or r.choices for r in results), results
    assert limited[0].body["code"] == "overloaded" and "x-should-retry" not in limited[0].response.headers


def test_curl_completion_stream_and_metrics(base_url: str) -> None:
    auth = ["-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json"]
    body = json.dumps({"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "temperature": 0})
    plain = subprocess.run(["curl", "-sS", "-H", "Expect: 100-continue", *auth, f"{base_url}/completions",
                            "-d", body], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(plain.stdout)["object"] == "text_completion", plain.stdout + plain.stderr
    stream_body = json.dumps({"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "stream": True})
    sse = subprocess.run(["curl", "-sS", "-N", *auth, f"{base_url}/completions", "-d", stream_body],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    events = [ln for ln in sse.stdout.splitlines() if ln]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), sse.stdout
    metrics = subprocess.run(["curl", "-sS", *auth, base_url.removesuffix("/v1") + "/metrics"],
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "# TYPE dslaunch_request_duration_seconds histogram" in metrics
    assert 'dslaunch_requests_total{op="completions",outcome="ok",protocol="http"}' in metrics
    assert "dslaunch_queue_depth 0.0" in metrics and "\ndslaunch_restarts " in metrics
    health = subprocess.run(["curl", "-sS", *auth, base_url.removesuffix("/v1") + "/health?deep=1"],
                            capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert json.loads(health)["deep"] is True and len(json.loads(health)["ranks"]) == 2


def test_status_shows_the_url_and_tunnel_forwards_a_local_port(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    cli, _ = job
    assert f"HTTP (OpenAI-compatible) http://127.0.0.1:{port}/v1" in cli("status").stdout
    proc = cli.popen("tunnel", "--local-port", "0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        local = int(line.split("127.0.0.1:")[1].split()[0])
        r = _oai(f"http://127.0.0.1:{local}/v1").completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert r.choices[0].text
    finally:
        proc.terminate()
        proc.wait(30)


def test_ndjson_and_http_clients_share_the_port_at_once(base_url: str, port: int) -> None:
    want = {p: _ndjson(port, p, 8)["text"] for p in PROMPTS}
    got: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []

    def http_client(p: str) -> None:
        try:
            r = _oai(base_url, retries=2).completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
            got.append(("http", p, r.choices[0].text))
        except BaseException as e:
            errors.append(e)

    def ndjson_client(p: str) -> None:
        try:
            got.append(("ndjson", p, _ndjson(port, p, 8)["text"]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f, args=(p,)) for p in PROMPTS for f in (http_client, ndjson_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(g[:2] for g in got) == sorted((k, p) for p in PROMPTS for k in ("http", "ndjson"))
    assert all(text == want[p] for _, p, text in got)
