"""Generation through the router, over two replicas of the built-in model: the text is the plain
model's, a stream whose replica dies mid-way goes on elsewhere when its output is deterministic
(and never repeats what its client has), and the OpenAI routes work through the router."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from dslaunch.client import FrontError
from dslaunch.engine import tinymodel
from dslaunch.wire.serve import ServeSpec
from tests.inproc import reference
from tests.routerkit import Kit

# the module's job (a router and two replicas) is set up within its first test's time
pytestmark = pytest.mark.timeout(600)

PROMPTS = ["Hello world", "The quick brown fox", "One command", "Tensor parallel layers"]
STEP_S = 0.03  # per decode step: a long stream is still running when its replica is killed
LONG = 100


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    work = tmp_path_factory.mktemp("work")
    tinymodel.build(work / "models" / tinymodel.NAME)
    k = Kit(work, ServeSpec(max_batch_size=4, batch_wait_ms=0, max_new_tokens=200, served_model_name="tiny"))
    try:
        k.start_router()
        for r in range(2):  # both start together: each is minutes of imports on a loaded small machine
            k.start_replica(r, delay=STEP_S, wait=False)
        for r in range(2):
            k.wait_state(r, "ready", 0, within=400)
        yield k
    finally:
        k.close()


@pytest.fixture(scope="module")
def ref(kit: Kit) -> Any:
    return reference(kit.work / "models" / tinymodel.NAME)


def _stream_killing_its_replica(kit: Kit, chunk_lps: list[int] | None = None, **params: Any) -> tuple[str, Any]:
    """Stream LONG tokens; once the first chunk is here, kill the replica running it and restart
    it afterwards. Returns the text the client got, and the final answer or the FrontError;
    `chunk_lps` gets the token ids of the logprobs the chunks carried."""
    text, end = "", None
    with kit.client() as c:
        try:
            for event in c.stream("Hello world", max_new_tokens=LONG, **params):
                if "chunk" in event:
                    if not text:
                        busy = [r["id"] for r in kit.health()["replicas"] if r["in_flight"]]
                        assert len(busy) == 1, busy
                        kit.kill_replica(busy[0])
                    text += event["chunk"]
                    if chunk_lps is not None and "logprobs" in event:
                        chunk_lps += event["logprobs"]["token_ids"]
                else:
                    end = event
        except FrontError as e:
            end = e
    for r in range(2):
        if r not in kit.procs:
            kit.start_replica(r, delay=STEP_S)
    return text, end


def test_greedy_text_through_the_router_is_the_plain_models(kit: Kit, ref: Any) -> None:
    out: dict[int, str] = {}

    def one(i: int) -> None:
        with kit.client() as c:
            out[i] = c.generate(PROMPTS[i], max_new_tokens=12)["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == {i: ref(p, 12) for i, p in enumerate(PROMPTS)}
    with kit.client() as c:
        both = c.generate(PROMPTS[:2], max_new_tokens=8)["results"]
    assert [r["text"] for r in both] == [ref(p, 8) for p in PROMPTS[:2]]


def test_a_greedy_stream_survives_the_loss_of_its_replica(kit: Kit, ref: Any) -> None:
    streamed: list[int] = []
    text, end = _stream_killing_its_replica(kit, chunk_lps=streamed, logprobs=1)
    assert isinstance(end, dict) and end["done"], end
    assert text == ref("Hello world", LONG) == end["text"], "re-run elsewhere; no text sent twice"
    answer = end["logprobs"]["token_ids"]
    assert len(answer) == end["tokens"] and streamed == answer[: len(streamed)], "no token's logprobs sent twice"
    assert len(streamed) >= len(answer) - 2, "the chunks carried (nearly) every token's logprobs"


def test_a_seeded_sampled_stream_survives_and_an_unseeded_one_says_why(kit: Kit) -> None:
    with kit.client() as c:
        want = c.generate("Hello world", max_new_tokens=LONG, temperature=1.0, seed=42)["text"]
    text, end = _stream_killing_its_replica(kit, temperature=1.0, seed=42)
    assert isinstance(end, dict) and text == want
    text, end = _stream_killing_its_replica(kit, temperature=1.0)
    assert isinstance(end, FrontError) and end.code == "unavailable", end
    assert "seed" in end.message and text


def test_a_client_that_leaves_mid_stream_frees_its_replica(kit: Kit) -> None:
    """The router tells the replica (an internal cancel on the link): it stops generating at once."""
    status = [kit.work / kit.job / f"node{r}" / "front.json" for r in range(2)]
    errors = [json.loads(p.read_text())["errors"] for p in status]
    with kit.client() as c:
        for event in c.stream("Hello world", max_new_tokens=200):
            assert "chunk" in event
            break
    kit.until(lambda: sum(r["in_flight"] for r in kit.health()["replicas"]) == 0)
    # the replica answered it with an error (the cancel), long before 200 slowed steps could end
    kit.until(lambda: sum(json.loads(p.read_text())["errors"] for p in status) == sum(errors) + 1)


def test_openai_client_and_curl_through_the_router(kit: Kit) -> None:
    base = f"http://127.0.0.1:{kit.port}/v1"
    with kit.client() as c:
        want = c.generate("Hello world", max_new_tokens=10)["text"]
        chat_want = c.generate("user: Hello\nassistant:", max_new_tokens=6)["text"]
    # until the router has its tokenizer (loaded once a replica is up; an error answer meanwhile)
    kit.until(lambda: [m.get("id") for m in json.loads(_curl(f"{base}/models")).get("data", [])] == ["tiny"])
    oai = openai.OpenAI(base_url=base, api_key="unused", timeout=120, max_retries=0)
    r = oai.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == 10
    messages = [{"role": "user", "content": "Hello"}]
    kit.until(lambda: _chat_works(oai))  # the router loads its tokenizer once a replica is up
    chat = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == chat_want
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 10, "temperature": 0}
    assert json.loads(_curl(f"{base}/completions", body))["choices"][0]["text"] == want
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0}
    assert json.loads(_curl(f"{base}/chat/completions", body))["choices"][0]["message"]["content"] == chat_want
    assert "dslaunch_requests_total" in _curl(base.removesuffix("/v1") + "/metrics")


def _chat_works(oai: openai.OpenAI) -> bool:
    try:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    except openai.InternalServerError as e:  # 503 `unavailable` while the router loads its tokenizer
        assert e.status_code == 503
        return False
    return True


def _curl(url: str, body: dict[str, Any] | None = None) -> str:
    args = ["-H", "Content-Type: application/json", "-d", json.dumps(body)] if body is not None else []
    out = subprocess.run(["curl", "-sS", *args, url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout
