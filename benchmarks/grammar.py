"""What structured output costs: the grammar mask's time per step as a share of the step, and the
throughput with a JSON schema against without, at 1 and 16 closed-loop clients.

The engine, the batcher and rank 0's real step loop in this process (`tests.inproc.Served`, one
rank, no sockets), the ~28M Llama built from a config (or the built-in tiny model), greedy. The
mask (`engine.grammar.mask`: every row's xgrammar bitmask filled, then applied to the logits)
and each whole step (`rank.paged_steps._step`: forward, mask, sampling, streaming) are timed in
place; the settings alternate round by round on the same engine. Goal: the mask at most 10% of
a decode step.

    python benchmarks/grammar.py [--seconds 4] [--rounds 3] [--model llama28m|tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import build_llama, closed_loop, table, write

NEW_TOKENS = 32
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}  # fmt: skip


class Timer:
    """Wraps a function: its calls' total seconds."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def compare_libraries(steps: int = 60) -> dict[str, float]:
    """Per-token mask cost (fill + apply) of xgrammar and, when installed, llguidance, on the
    built-in tokenizer and SCHEMA, walking random allowed tokens: what chose xgrammar."""
    import json
    import random

    import torch

    from dslaunch.engine import tinymodel

    tok = tinymodel.build_tokenizer()
    vocab = len(tok)
    out: dict[str, float] = {}

    def walk(fill: Any, accept: Any, done: Any) -> float:
        rng, spent, n = random.Random(0), 0.0, 0
        for _ in range(steps):
            logits = torch.randn(1, vocab)
            t0 = time.perf_counter()
            fill(logits)
            spent += time.perf_counter() - t0
            allowed = (logits[0] > -1e30).nonzero().flatten().tolist()
            n += 1
            if not allowed or not accept(rng.choice(allowed)) or done():
                break
        return spent / n

    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    bits = xgr.allocate_token_bitmask(1, vocab)

    def xfill(logits: Any) -> None:
        matcher.fill_next_token_bitmask(bits)
        xgr.apply_token_bitmask_inplace(logits, bits)

    out["xgrammar"] = walk(xfill, matcher.accept_token, matcher.is_terminated)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt
    except ImportError:
        return out
    ltok = llguidance.hf.from_tokenizer(tok)
    lm = llguidance.LLMatcher(ltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    lbits = lt.allocate_token_bitmask(1, ltok.vocab_size)

    def lfill(logits: Any) -> None:
        lt.fill_next_token_bitmask(lm, lbits, 0)
        lt.apply_token_bitmask_inplace(logits, lbits)

    out["llguidance"] = walk(lfill, lm.consume_token, lm.is_stopped)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="llama28m", choices=["llama28m", "tiny"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from dslaunch.engine import generation, tinymodel
    from dslaunch.rank import paged_steps
    from tests.inproc import Served

    torch.set_num_threads(1)
    mask, step = Timer(generation.grammar_mask), Timer(paged_steps._step)
    generation.grammar_mask, paged_steps._step = mask, step
    tmp = Path(tempfile.mkdtemp(prefix="bench-grammar-"))
    model = build_llama(tmp / "llama28m") if args.model == "llama28m" else tinymodel.build(tmp / tinymodel.NAME)
    served = Served(model, tmp / "work", max_batch_size=16, max_new_tokens=NEW_TOKENS, batch_wait_ms=0.0)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    settings: dict[str, dict[str, Any]] = {"plain": {}, "json_schema": {"response_format": fmt}}
    rows: list[list[Any]] = []
    result: dict[str, Any] = {}
    try:
        for extra in settings.values():  # warm-up: the schema compiles once, here
            served.ask({"id": 0, "op": "generate", "prompt": "warm up", "max_new_tokens": 4, **extra})
        for clients in (1, 16):
            tps: dict[str, list[float]] = {name: [] for name in settings}
            shares: list[float] = []
            for _ in range(args.rounds):
                for name, extra in settings.items():

                    def one(i: int, _state: dict[str, Any], extra: dict[str, Any] = extra) -> tuple[int, None]:
                        req = {"id": i, "op": "generate", "prompt": f"Person {i:02d} as JSON:",
                               "max_new_tokens": NEW_TOKENS, **extra}  # fmt: skip
                        return int(served.ask(req)[0]["tokens"]), None

                    m0, s0 = mask.seconds, step.seconds
                    tps[name].append(closed_loop(clients, args.seconds, one)["tokens_per_s"])
                    if name == "json_schema":
                        shares.append((mask.seconds - m0) / max(step.seconds - s0, 1e-9))
            med = {name: statistics.median(v) for name, v in tps.items()}
            share = statistics.median(shares)
            rows.append([clients, med["plain"], med["json_schema"], med["json_schema"] / med["plain"], 100 * share])
            result[str(clients)] = {"tokens_per_s": tps, "median_tokens_per_s": med, "mask_share_of_step": shares,
                                    "median_mask_share": share}  # fmt: skip
    finally:
        served.close()
    print(table(["clients", "plain tok/s", "json_schema tok/s", "ratio", "mask % of step"], rows))
    libraries = compare_libraries()
    print(table(["library", "ms per token (fill + apply)"], [[k, 1000 * v] for k, v in libraries.items()]))
    result["library_seconds_per_token"] = libraries
    write("grammar", {"model": args.model, "seconds": args.seconds, "rounds": args.rounds, "schema": SCHEMA,
                      "goal": "mask <= 10% of a decode step", **result}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
