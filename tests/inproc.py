"""The serving loop in this process: a real engine (DeepSpeed at world size 1 over a gloo group),
the real batcher and rank 0's real loop in a thread, without sockets. Fast enough for many
requests per test; what the front adds is covered by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dslaunch.engine.base import EngineContext
from dslaunch.rank.lockstep import Channel, lead
from dslaunch.serving.batcher import Batcher, Pending
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.stats import Stats
from dslaunch.wire.protocol import Limits, ProtocolError, parse_request
from dslaunch.wire.serve import ServeSpec


def process_group() -> Any:
    """A gloo group of one (this process), formed once per test session, on an in-process store: no
    port to pick, so nothing else on a busy machine can take it between the pick and the bind."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def save_random(make: Callable[[], Any], tok: Any, out: Path) -> Path:
    """Build a model with `make()` under a fixed seed, give its matrices large random weights (so
    greedy text varies with the prompt), and save it with `tok` to `out`."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = make()
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_family(kind: str, out: Path) -> Path:
    """A 2-layer, 64-wide model of one family with random weights and dslaunch's tiny tokenizer."""
    import transformers as tf

    from dslaunch.engine.tinymodel import build_tokenizer

    tok = build_tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    base = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, **ids}  # fmt: skip
    cfg = {
        "llama-gqa": lambda: tf.LlamaConfig(**base, num_key_value_heads=2, tie_word_embeddings=False),
        "llama-tied": lambda: tf.LlamaConfig(**base, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**base, num_key_value_heads=2),  # q/k/v biases
        "gpt-neox": lambda: tf.GPTNeoXConfig(**base, tie_word_embeddings=False),  # fused query_key_value
        "phi3": lambda: tf.Phi3Config(**base, num_key_value_heads=2),  # fused qkv_proj, gate_up_proj
        "gpt2": lambda: tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, **ids),
        "bert": lambda: tf.BertConfig(**base),
    }[kind]()
    auto = tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM
    return save_random(lambda: auto.from_config(cfg), tok, out)


def build_gpt2(out: Path, positions: int = 64) -> Path:
    """A tiny GPT-2 (absolute positions, a short position table) with the tiny model's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dslaunch.engine import tinymodel

    tok = tinymodel.build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=positions,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)  # fmt: skip
    return save_random(lambda: GPT2LMHeadModel(cfg), tok, out)


class Served:
    """An engine behind the batcher and the lead loop; `ask` submits one request line."""

    def __init__(self, model: Path, work: Path, **spec: Any) -> None:
        from dslaunch.engine.loader import load_engine

        spec.setdefault("batch_wait_ms", 0.0)
        self.spec = ServeSpec(model=str(model), **spec)
        ctx = EngineContext(rank=0, world_size=1, local_rank=0, device="cpu", multi_node=False, work_dir=work,
                            group=process_group(), options=self.spec)  # fmt: skip
        self.engine = load_engine(self.spec, ctx)
        self.limits = Limits(max_prompts=self.spec.max_batch_size, max_new_tokens=self.spec.max_new_tokens)
        self.stats = Stats()
        self.batcher = Batcher(
            FrontConfig(max_batch_size=self.spec.max_batch_size, batch_wait_ms=self.spec.batch_wait_ms,
                        max_queue=self.spec.max_queue),
            self.stats,
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._io.start()
        self.error: BaseException | None = None
        self._lead = threading.Thread(target=self._run, daemon=True)
        self._lead.start()

    def _run(self) -> None:
        try:
            lead(self.engine, Channel(0, 1, 60), self.batcher, 0.5)
        except BaseException as e:
            self.error = e

    @property
    def alive(self) -> bool:
        return self._lead.is_alive() and self.error is None

    def submit(self, request: dict[str, Any]) -> Pending:
        """Parse, check (tokenize) and queue, as the front does; ProtocolError when refused."""
        req = parse_request(json.dumps(request), self.limits)
        if req.op == "generate":
            self.engine.check(req)
        job = Pending(req, self.loop)
        self.batcher.submit(job)
        return job

    def events(self, job: Pending, timeout: float = 120) -> list[tuple[Any, ...]]:
        """Every event of a request, up to its answer or error."""

        async def collect() -> list[tuple[Any, ...]]:
            out = []
            while True:
                event = await job.events.get()
                out.append(event)
                if event[0] != "chunk":
                    job.cancelled = True  # as the front does once answered
                    return out

        return asyncio.run_coroutine_threadsafe(collect(), self.loop).result(timeout)

    def ask(self, request: dict[str, Any], timeout: float = 120) -> Any:
        """The answer: a list of row results, or ProtocolError raised with the request's code."""
        event = self.events(self.submit(request), timeout)[-1]
        if event[0] == "error":
            raise ProtocolError(event[1], event[2])
        return event[1]

    def close(self) -> None:
        self.batcher.close()
        self._lead.join(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._io.join(5)
        self.loop.close()


def reference(model: Path) -> Any:
    """Solo greedy generation with the plain transformers model: (prompt, k) -> text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)

    def generate(prompt: str, k: int) -> str:
        ids = tok(prompt, return_tensors="pt")
        out = lm.generate(**ids, max_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def serve_tiny(tmp_path_factory: Any, **spec: Any) -> Iterator[Served]:
    """The built-in tiny model served in this process for a module's tests (a fixture's body),
    closed after them."""
    from dslaunch.engine import tinymodel

    model = tinymodel.build(tmp_path_factory.mktemp("models") / tinymodel.NAME)
    served = Served(model, tmp_path_factory.mktemp("work"), **spec)
    try:
        yield served
    finally:
        served.close()
