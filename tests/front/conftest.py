"""One live job for the HTTP tests: 2 ranks on localhost, a token, small limits that tests can hit."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cli, local_job

TOKEN = "front-test-token-0123456789abcdef"
IDLE_S = 4
MAX_QUEUE = 6


@pytest.fixture(scope="package")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any]]]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    yield from local_job(
        tmp_path_factory, "-H", "hostfiles/localhost", "--token-file", str(token_file), "--idle-timeout",
        str(IDLE_S), "--max-queue", str(MAX_QUEUE), "--max-batch-size", "4", "--write-timeout", "3",
        "--served-model-name", "tiny",
    )  # fmt: skip


@pytest.fixture(scope="package")
def port(job: tuple[Cli, dict[str, Any]]) -> int:
    """The front's port, once its OpenAI routes have the tokenizer: the router loads it on first
    use and answers `unavailable` meanwhile, which on a loaded 2-core machine can outlast a test."""
    port = int(job[1]["front"]["port"])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {TOKEN}"})
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                if json.loads(r.read())["data"]:
                    return port
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.fixture(scope="package")
def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"
