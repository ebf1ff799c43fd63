"""lm-evaluation-harness against the live job: its `local-completions` model (token ids, `echo`,
`logprobs`, as every harness scores multiple choice) gets the same log-likelihoods, within 1e-4,
and the same `generate_until` text as its `hf` model on the same weights. The tasks are made
here: a few documents in a local JSON file, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dslaunch.engine import tinymodel
from tests.front.conftest import TOKEN

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " runs away"], "answer": 0},
    {"question": "One command starts", "choices": [" a job", " nothing", " every node of the cluster"], "answer": 0},
    {"question": "Tensor parallel layers", "choices": [" split", " merge"], "answer": 1},
    {"question": "Hello", "choices": [" world", " there"], "answer": 0},
]
TASKS = """\
task: {name}_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
---
task: {name}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _evaluate(model: str, args: dict[str, Any], tasks: Path, names: list[str]) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return simple_evaluate(model=model, model_args=args, tasks=names, task_manager=manager, log_samples=True,
                           batch_size=2, num_fewshot=0)  # fmt: skip


def _responses(out: dict[str, Any], task: str) -> list[Any]:
    """Per document, in order: its filtered responses (choices' log-likelihoods, or the text)."""
    return [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "OPENAI_API_KEY": TOKEN, "TOKENIZERS_PARALLELISM": "false"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, text in enumerate(TASKS.format(name="dslaunch", data=data).split("---\n")):
        (tasks / f"task{i}.yaml").write_text(text)
    return tasks


def test_lm_eval_scores_through_the_job_equal_the_plain_models(offline: Path, port: int, tmp_path: Path) -> None:
    model = tinymodel.build(tmp_path / tinymodel.NAME)  # the job's built-in model, built the same way
    names = ["dslaunch_choice", "dslaunch_gen"]
    api = {"model": "tiny", "tokenizer": str(model), "tokenizer_backend": "huggingface", "num_concurrent": 1,
           "base_url": f"http://127.0.0.1:{port}/v1/completions", "max_retries": 1}  # fmt: skip
    served = _evaluate("local-completions", api, offline, names)
    plain = _evaluate("hf", {"pretrained": str(model), "device": "cpu", "dtype": "float32"}, offline, names)
    got, want = _responses(served, "dslaunch_choice"), _responses(plain, "dslaunch_choice")
    assert [len(doc) for doc in got] == [len(d["choices"]) for d in DOCS]
    for doc_got, doc_want in zip(got, want, strict=True):
        assert [float(ll) for ll, _ in doc_got] == pytest.approx([float(ll) for ll, _ in doc_want], abs=1e-4)
        assert [bool(g) for _, g in doc_got] == [bool(g) for _, g in doc_want], "greedy flags from top_logprobs"
    assert _responses(served, "dslaunch_gen") == _responses(plain, "dslaunch_gen")
    for task, metric in (("dslaunch_choice", "acc,none"), ("dslaunch_gen", "exact_match,none")):
        assert served["results"][task][metric] == plain["results"][task][metric]
