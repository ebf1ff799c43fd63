"""Shard-only loading (`engine/shardload.py`) against today's loading (`from_pretrained` + AutoTP):
bit-exact parameters and buffers, in this process and on both ranks of a real 2-process gloo group,
for every family the suite serves at TP=2 (grouped-query attention, tied embeddings, a fused
query_key_value, attention biases, a BERT encoder), whose TP=2 forward is also the plain model's;
and what makes it step aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dslaunch.engine.shardload import NotShardable, box, weight_files
from tests.inproc import build_family as build

ROOT = Path(__file__).resolve().parent.parent


FAMILIES = ["llama-gqa", "llama-tied", "qwen2", "gpt-neox", "bert"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dslaunch.engine import tinymodel

    root = tmp_path_factory.mktemp("families")
    built = {kind: build(kind, root / kind) for kind in FAMILIES}
    built["tiny"] = tinymodel.build(root / "tiny")
    return built


def test_both_ranks_load_exactly_todays_parameters_from_their_slices(models: dict[str, Path], tmp_path: Path) -> None:
    """Two real ranks in a gloo group; each compares every tensor it holds with today's loading."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    argv = [str(store), str(tmp_path), *(str(p) for p in models.values())]
    run = [sys.executable, "-m", "tests.shardcheck"]
    procs = [subprocess.Popen([*run, str(r), "2", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    for rank in range(2):
        found = json.loads((tmp_path / f"{rank}.json").read_text())
        for kind, path in models.items():
            got = found[str(path)]
            assert got["differ"] == [], (kind, rank, got["differ"])
            done, total = got["progress"]
            assert done == total == got["shard_bytes"], (kind, rank, got["progress"])
            assert got["eos"] == got["want_eos"], kind
            assert got["forward_gap"] < 1e-4, (kind, rank, got["forward_gap"])  # TP=2 computes the plain model
    whole = {kind: sum(f.stat().st_size for f in path.glob("*.safetensors")) for kind, path in models.items()}
    for kind, path in models.items():  # each rank read about half: the sharded matrices, plus what both hold
        read = [json.loads((tmp_path / f"{r}.json").read_text())[str(path)]["shard_bytes"] for r in range(2)]
        assert max(read) < 0.85 * whole[kind], (kind, read, whole[kind])


@pytest.mark.parametrize("kind", ["llama-tied", "gpt-neox", "bert"])
def test_in_process_the_meta_build_and_fill_match_from_pretrained(models: dict[str, Path], kind: str) -> None:
    """At one rank nothing is sliced, so this is the meta build, buffers, tying and filling alone."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from dslaunch.engine.shardload import load_sharded
    from tests.shardcheck import compare

    path = str(models[kind])
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    got = load_sharded(auto, path, config, torch.float32, lambda m: m.to_empty(device="cpu"), 0)
    want = auto.from_pretrained(path, dtype=torch.float32)
    assert compare(got, want) == []


def test_a_box_is_read_as_slices_and_anything_else_is_not() -> None:
    class Piece:
        def __init__(self, shape: tuple[int, ...], offset: int, strides: tuple[int, ...]) -> None:
            self.shape, self.source_offset, self.source_strides = shape, offset, strides

    full = (8, 6)
    assert box(Piece((4, 6), 24, (6, 1)), full) == (slice(4, 8), slice(0, 6))  # rows 4..7
    assert box(Piece((8, 3), 3, (6, 1)), full) == (slice(0, 8), slice(3, 6))  # columns 3..5
    assert box(Piece((8, 3), 3, (1, 8)), full) is None  # transposed strides: not a box
    assert box(Piece((48,), 0, (1,)), full) is None  # flattened
    assert box(Piece((4, 6), 30, (6, 1)), full) is None  # runs past the end


def test_what_rules_shard_only_loading_out_is_said_before_any_weight_is_read(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(NotShardable, match=r"no model\.safetensors"):
        weight_files(str(tmp_path))


def test_the_slice_reader_reads_every_box_as_safetensors_does(tmp_path: Path) -> None:
    """pread of a box's runs (merged where close) against safetensors' own get_slice, per dtype."""
    import random

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dslaunch.engine.slicereader import SliceReader

    gen = torch.Generator().manual_seed(3)
    tensors = {"m": torch.randn(64, 16384, generator=gen), "i": torch.arange(17, dtype=torch.int64),
               "h": torch.randn(3, 40, 33, generator=gen).to(torch.bfloat16), "s": torch.tensor(2.5)}  # fmt: skip
    save_file(tensors, tmp_path / "t.safetensors")
    reader = SliceReader(tmp_path / "t.safetensors")
    rnd = random.Random(5)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for key, t in tensors.items():
            assert torch.equal(reader.read(key), t), key
            for _ in range(20):
                where = []
                for n in t.shape:
                    a = rnd.randrange(n)
                    where.append(slice(a, rnd.randrange(a + 1, n + 1)))
                got, want = reader.read(key, tuple(where)), f.get_slice(key)[tuple(where)]
                assert got.dtype == want.dtype and torch.equal(got, want), (key, where)
    reader.bytes_read = 0
    reader.read("m", (slice(0, 64), slice(0, 8192)))  # half of each 64 KB row: runs 32 KB apart, read alone
    assert reader.bytes_read == 64 * 8192 * 4
    reader.bytes_read = 0
    reader.read("m", (slice(0, 64), slice(0, 15872)))  # runs 2 KB apart, less than a page: merged
    assert reader.bytes_read == 63 * 16384 * 4 + 15872 * 4
    reader.bytes_read = 0
    reader.read("m", (slice(0, 32), slice(0, 16384)))  # a block of rows: one run, exactly its bytes
    assert reader.bytes_read == 32 * 16384 * 4
    reader.close()
