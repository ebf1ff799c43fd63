"""Which model families DeepSpeed's AutoTP can shard, decided from `config.json` alone.

Pre-flight reads the model's config on node 0 and refuses, in seconds and before any rank starts,
what would otherwise fail on every rank after loading (and be restarted over and over):

- families AutoTP refuses outright: `AutoTP.supported()` in deepspeed/module_inject/auto_tp.py
  (unchanged for years), "AutoTP not supported for model";
- families it shards wrongly, found by serving random-weight models at TP=2 and comparing with
  plain transformers (DeepSpeed 0.19.8, CPU): the first forward fails on every rank. Refused up
  to the DeepSpeed version checked; with a newer one, the forward `up` runs on every rank before
  it says ready decides (and `--skip-model-check` skips this list).

Neither applies to one rank (no sharding) or to `--kernel-inject` (DeepSpeed's own policies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# AutoTP.supported(): the lower-cased class-name prefixes it refuses (GPT2Model -> "gpt2")
AUTOTP_REFUSED = frozenset({"deberta", "flaubert", "fsmt", "gpt2", "led", "longformer", "xlm", "xlnet"})
# model_types whose transformers class prefix is not the model_type itself (tests check the table
# against transformers' MODEL_MAPPING_NAMES and AutoTP.supported for every family)
CLASS_PREFIX = {"gpt-sw3": "gpt2"}
# model_type -> (does this config hit it, what goes wrong at TP=2)
AUTOTP_BROKEN: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "phi3": (lambda c: True, "its fused qkv_proj/gate_up_proj are split wrongly (mat1 and mat2 shapes cannot be "
             "multiplied at the first forward)"),
    "falcon": (lambda c: not c.get("new_decoder_architecture") and c.get("multi_query", True),
               "the single key/value head of its fused query_key_value (multi_query) is split wrongly"),
    "bloom": (lambda c: True, "its ALiBi attention bias is not split with the heads"),
    "mpnet": (lambda c: True, "its relative attention bias is not split with the heads"),
}  # fmt: skip
BROKEN_CHECKED_UP_TO = (0, 19, 8)
WAY_OUT = "run it on one rank (--num-nodes 1 --num-gpus 1), or with --kernel-inject on GPUs"


def _version(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "").split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def autotp_key(model_type: str) -> str:
    """The name AutoTP judges a family by: its transformers class prefix, lower-cased."""
    mt = model_type.lower()
    return CLASS_PREFIX.get(mt, mt).replace("-", "").replace("_", "")


def family_problem(
    model: str, config: dict[str, Any] | None, world_size: int, kernel_inject: bool, deepspeed: str | None
) -> str | None:
    """One line saying why AutoTP cannot serve this model on this many ranks, or None."""
    if not config or world_size < 2 or kernel_inject:
        return None
    mtype = str(config.get("model_type") or "")
    if autotp_key(mtype) in AUTOTP_REFUSED:
        return (
            f"--model {model}: DeepSpeed's AutoTP does not support {mtype} models (\"AutoTP not supported for "
            f'model"), so it cannot be split over {world_size} ranks; {WAY_OUT}'
        )
    hits, why = AUTOTP_BROKEN.get(mtype.lower(), (lambda c: False, ""))
    if hits(config) and deepspeed and _version(deepspeed) <= BROKEN_CHECKED_UP_TO:
        return (
            f"--model {model}: DeepSpeed {deepspeed}'s AutoTP shards {mtype} models wrongly: {why}; {WAY_OUT} "
            "(--skip-model-check to try anyway)"
        )
    return None
