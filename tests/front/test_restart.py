"""A rank lost during HTTP requests: a running stream ends with an error event, a queued request
gets 503 with Retry-After and `x-should-retry: false` (it was accepted, so the SDK must not run it
again by itself); after the gang restart the same port answers again."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import openai
import pytest

from dslaunch.client import Client
from tests.conftest import Cli, status_json, wait_status
from tests.front.conftest import TOKEN


def test_a_lost_rank_is_503_not_retried_and_the_job_comes_back(job: tuple[Cli, dict[str, Any]], base_url: str) -> None:
    cli, rec = job
    before = status_json(cli)
    rank1 = next(r for r in before["ranks"] if r["rank"] == 1)
    result: dict[str, Any] = {}
    sdk = openai.OpenAI(base_url=base_url, api_key=TOKEN, timeout=120, max_retries=2)

    def long_request() -> None:
        try:
            result["ok"] = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=400, temperature=0)
        except openai.APIStatusError as e:
            result["error"] = e

    # a stream running when the rank is lost, and a request queued behind it
    stream = sdk.completions.create(model="tiny", prompt="Hi", max_tokens=400, temperature=0, stream=True)
    events = iter(stream)
    assert next(events).choices[0].text is not None
    t = threading.Thread(target=long_request)
    t.start()
    with Client("127.0.0.1", rec["front"]["port"], token=TOKEN, timeout=30) as c:
        deadline = time.monotonic() + 60
        # both rows in the running batch (continuous batching: the second joins, it does not queue)
        while c.stats()["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    os.kill(rank1["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError) as mid:
        for _ in events:
            pass
    assert "restarting" in str(mid.value), "the stream ends with an error event"
    t.join(120)
    err = result.get("error")
    assert err is not None, f"the running request was refused: {result}"
    assert err.status_code == 503 and err.body["code"] == "unavailable", err.body
    assert err.response.headers["x-should-retry"] == "false" and err.response.headers["retry-after"]
    st = wait_status(cli, lambda s: s["front"].get("ready") and all(r["stage"] == "ready" for r in s["ranks"])
                     and min(r["restarts"] for r in s["ranks"]) >= 1, timeout=240)  # fmt: skip
    assert st["front"]["ready"], st
    r = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert r.choices[0].text
