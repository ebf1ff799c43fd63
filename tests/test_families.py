"""Model families at TP=2 on localhost, from configs with random weights, compared token for token
with plain transformers; families AutoTP cannot shard are refused in seconds, and one it shards
wrongly fails `up` at the first forward, named, without restarts.

The built-in tiny Llama (tests/test_serve.py) and all-MiniLM-L6-v2, a BERT encoder for
`--task embed` (tests/test_serve_ssh.py), are the matrix's other rows; README "Model families".
GPT-NeoX (a fused query_key_value), Qwen2 and a tied Llama are checked at TP=2 against the plain
model's forward in tests/test_shardload.py, in two gloo processes rather than a served job each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.launch.families import AUTOTP_BROKEN, AUTOTP_REFUSED, autotp_key, family_problem
from tests.conftest import Cli, job_pids, local_job
from tests.inproc import build_family as build

PROMPTS = ["Hello world", "The quick brown fox", "Numbers 0 1 2"]


# -- pre-flight's rules, against DeepSpeed's and transformers' own tables --------------------------


def test_refused_families_match_autotp_for_every_transformers_family() -> None:
    """AutoTP judges the class name; pre-flight sees only config.json's model_type."""
    pytest.importorskip("deepspeed")
    from deepspeed.module_inject.auto_tp import AutoTP
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    checked = 0
    for model_type, cls in MODEL_MAPPING_NAMES.items():
        if not isinstance(cls, str) or not cls.endswith("Model"):
            continue
        ds_refuses = not AutoTP.supported(f"Wrapper(\n  (model): {cls}(")
        assert (autotp_key(model_type) in AUTOTP_REFUSED) == ds_refuses, (model_type, cls)
        checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    ("config", "world", "inject", "ds", "fragment"),
    [
        ({"model_type": "gpt2"}, 2, False, "0.19.8", "DeepSpeed's AutoTP does not support gpt2 models"),
        ({"model_type": "gpt-sw3"}, 2, False, "0.19.8", "does not support gpt-sw3 models"),
        ({"model_type": "phi3"}, 4, False, "0.19.8", "AutoTP shards phi3 models wrongly"),
        ({"model_type": "falcon"}, 2, False, "0.19.8", "single key/value head"),
        ({"model_type": "falcon", "new_decoder_architecture": True}, 2, False, "0.19.8", None),
        ({"model_type": "phi3"}, 2, False, "0.20.0", None),  # newer DeepSpeed: the first forward decides
        ({"model_type": "gpt2"}, 1, False, "0.19.8", None),  # one rank: nothing to shard
        ({"model_type": "gpt2"}, 2, True, "0.19.8", None),  # kernel injection: DeepSpeed's own policy
        ({"model_type": "llama"}, 2, False, "0.19.8", None),
        (None, 2, False, "0.19.8", None),  # config not found (a hub name not in the cache)
    ],
)
def test_family_problem(config: Any, world: int, inject: bool, ds: str, fragment: str | None) -> None:
    got = family_problem("/m", config, world, inject, ds)
    if fragment is None:
        assert got is None
    else:
        assert got and fragment in got and "\n" not in got
        assert got.startswith("--model /m: ") and "--num-nodes 1 --num-gpus 1" in got and "--kernel-inject" in got


class FakeChannel:
    """Every rank's outcome at once, as `Channel.gather` returns them."""

    def __init__(self, others: list[str | None]) -> None:
        self.others = others

    def gather(self, mine: str | None) -> list[str | None]:
        return [mine, *self.others]


def test_a_startup_step_is_compared_across_ranks() -> None:
    from dslaunch.rank.session import SameOnEveryRank, checked

    def boom() -> None:
        raise ValueError("bad shard")

    assert checked(FakeChannel([None]), "loading", lambda: 7) == 7
    with pytest.raises(SameOnEveryRank, match="loading failed the same way on every rank: ValueError: bad shard"):
        checked(FakeChannel(["ValueError: bad shard"]), "loading", boom)
    with pytest.raises(RuntimeError, match="loading failed on rank 1: OSError: disk") as e:
        checked(FakeChannel(["OSError: disk"]), "loading", lambda: 7)  # this rank worked, another did not
    assert getattr(e.value, "retry", True), "a failure on some ranks only is restarted as usual"


def test_broken_list_names_real_model_types() -> None:
    from transformers import CONFIG_MAPPING

    assert set(AUTOTP_BROKEN) <= set(CONFIG_MAPPING)


# -- real jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama-gqa"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, Path]]:
    model = build(request.param, tmp_path_factory.mktemp(request.param))
    for cli, _rec in local_job(tmp_path_factory, "--num-gpus", "2", "--model", str(model), "--max-new-tokens", "32"):
        yield cli, model


def test_greedy_tokens_match_plain_transformers_at_tp2(job: tuple[Cli, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli, path = job
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        res = cli("query", prompt, "-k", "10", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["text"] == want, prompt
    st = json.loads(cli("status", "--json").stdout)
    assert st["world_size"] == 2 and all(r["restarts"] == 0 for r in st["ranks"])
    logs = cli("logs", "--lines", "400").stdout
    assert logs.count("loaded this rank's shard only") == 2, logs[-3000:]  # and said so, on both ranks


def test_refused_families_fail_in_preflight_in_seconds(cli: Cli, tmp_path: Path) -> None:
    for kind, fragment in (("gpt2", "does not support gpt2 models"), ("phi3", "shards phi3 models wrongly")):
        model = build(kind, tmp_path / kind)
        t0 = time.monotonic()
        res = cli.up("--num-gpus", "2", "--model", str(model))
        took = time.monotonic() - t0
        assert res.returncode == 1 and fragment in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert "--num-nodes 1 --num-gpus 1" in res.stderr
        assert took < 30, f"refused after {took:.0f}s"
        assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == [], "no rank was started"


def test_a_family_sharded_wrongly_fails_up_at_the_first_forward_without_restarts(cli: Cli, tmp_path: Path) -> None:
    model = build("phi3", tmp_path / "phi3")
    res = cli.up("--num-gpus", "2", "--model", str(model), "--skip-model-check", "--max-restarts", "3")
    assert res.returncode == 1, res.stdout + res.stderr
    first = next(ln for ln in res.stderr.splitlines() if ln.startswith("Error:"))
    assert "the first forward failed the same way on every rank" in first, res.stderr
    assert "mat1 and mat2 shapes cannot be multiplied" in first
    assert "attempt 1" not in res.stderr and "restart" not in first, "not restarted"
    assert job_pids(f"DSLAUNCH_NODE_DIR={cli.work_dir}") == []
