"""One rank of the shard-only loading check: `python -m tests.shardcheck RANK WORLD STORE OUT MODEL...`.

For each model directory, this rank loads its shard both ways (shard-only, and today's
`from_pretrained` + AutoTP) in a real gloo group of WORLD processes, and writes to OUT/RANK.json
what it found: every parameter or buffer that differs (name, shape or dtype, or any element), the
progress it reported, and how far the sharded forward is from the plain model's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def compare(a: Any, b: Any) -> list[str]:
    """Names whose tensors are not bit-identical between two modules (parameters and buffers)."""
    import torch

    def tensors(m: Any) -> dict[str, Any]:
        out = dict(m.named_parameters(remove_duplicate=False))
        out.update(dict(m.named_buffers(remove_duplicate=False)))
        return out

    ta, tb = tensors(a), tensors(b)
    bad = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.is_meta or x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            bad.append(name)
    return bad


def check(model: str, rank: int, world: int) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from dslaunch.engine.base import EngineContext, shard
    from dslaunch.engine.shardload import load_sharded
    from dslaunch.wire.serve import ServeSpec

    opts = ServeSpec(model=model)
    ctx = EngineContext(rank=rank, world_size=world, local_rank=rank, device="cpu", multi_node=False,
                        work_dir=Path(model), options=opts)  # fmt: skip
    config = AutoConfig.from_pretrained(model)
    auto = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    seen: list[tuple[int, int]] = []
    sharded = load_sharded(auto, model, config, torch.float32, lambda m: shard(m, ctx, torch.float32, opts), rank,
                           lambda done, total: seen.append((done, total)))  # fmt: skip
    whole = shard(auto.from_pretrained(model, dtype=torch.float32), ctx, torch.float32, opts)
    shard_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in sharded.parameters()}.values())
    eos = [getattr(getattr(m, "generation_config", None), "eos_token_id", None) for m in (sharded, whole)]
    # the sharded forward against the plain model's, on every rank: AutoTP splits this family rightly
    ids = torch.tensor([[5, 17, 42, 99, 7, 63, 21, 8]])
    with torch.no_grad():
        got = sharded(input_ids=ids)
        want = auto.from_pretrained(model, dtype=torch.float32).eval()(input_ids=ids)
    key = "logits" if hasattr(want, "logits") else "last_hidden_state"
    gap = float((got[key] - want[key]).abs().max())
    return {"differ": compare(sharded, whole), "progress": seen[-1] if seen else None, "shard_bytes": shard_bytes,
            "eos": eos[0], "want_eos": eos[1], "forward_gap": gap}  # fmt: skip


def main() -> None:
    import torch
    import torch.distributed as dist

    rank, world, store, out, *models = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=int(rank), world_size=int(world))
    found = {m: check(m, int(rank), int(world)) for m in models}
    Path(out, f"{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
