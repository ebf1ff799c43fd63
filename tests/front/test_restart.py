"""A rank lost during HTTP requests: the router runs a greedy stream and a plain request again once
the replica is back (the client sees neither the loss nor repeated text); a sampled stream without
a seed, which cannot be replayed, ends with an error event saying why; the port answers throughout."""

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

K = 300


def test_a_lost_rank_loses_no_replayable_request(job: tuple[Cli, dict[str, Any]], base_url: str) -> None:
    cli, rec = job
    before = status_json(cli)
    rank1 = next(r for r in before["ranks"] if r["rank"] == 1)
    result: dict[str, Any] = {}
    sdk = openai.OpenAI(base_url=base_url, api_key=TOKEN, timeout=180, max_retries=0)

    def plain_request() -> None:
        try:
            result["ok"] = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=K, temperature=0)
        except openai.APIError as e:
            result["error"] = e

    greedy = iter(sdk.completions.create(model="tiny", prompt="Hi", max_tokens=K, temperature=0, stream=True))
    # ignore_eos: a sampled row of the random tiny model can draw its end token within K tokens
    sampled = iter(sdk.completions.create(model="tiny", prompt="Hi", max_tokens=K, temperature=1.0, stream=True,
                                          extra_body={"ignore_eos": True}))  # fmt: skip
    text = next(greedy).choices[0].text
    assert next(sampled).choices[0].text is not None
    t = threading.Thread(target=plain_request, daemon=True)
    t.start()
    with Client("127.0.0.1", rec["front"]["port"], token=TOKEN, timeout=30) as c:
        deadline = time.monotonic() + 60
        while c.stats()["in_flight"] < 3:  # all three on the replica
            assert time.monotonic() < deadline, f"the three requests are not all running: {c.stats()}"
            time.sleep(0.02)
    os.kill(rank1["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError) as mid:
        for _ in sampled:
            pass
    assert "seed" in str(mid.value), "the unseeded sampled stream says why it cannot go on"
    text += "".join(e.choices[0].text for e in greedy)  # no error: it goes on after the restart
    t.join(180)
    assert "ok" in result, result
    st = wait_status(cli, lambda s: s["state"] == "ready" and min(r["restarts"] for r in s["ranks"]) >= 1, 240)
    assert st["front"]["ready"], st
    again = sdk.completions.create(model="tiny", prompt="Hi", max_tokens=K, temperature=0)
    assert again.choices[0].text == text, "the resumed stream is the uninterrupted text, nothing repeated"
    plain = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=K, temperature=0)
    assert result["ok"].choices[0].text == plain.choices[0].text
