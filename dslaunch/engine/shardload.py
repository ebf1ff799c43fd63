"""Shard-only loading: each rank reads from the safetensors files only the slices its shard holds.

`from_pretrained` on every rank maps and reads the whole checkpoint, so a rank's resident size
peaks at the whole model and every node reads every byte. Here the model is built with its
parameters on the meta device (buffers real, computed as `__init__` computes them), DeepSpeed
AutoTP shards the meta model (deciding every split, moving no data; DeepSpeed then allocates each
shard empty), and each parameter is filled in place from its slices of the checkpoint. DeepSpeed
records each sharded parameter's layout as an affine map (`deepspeed.checkpoint.affine`): pieces
of the full tensor by offset and strides. A piece that is a box of the full tensor is read as
its contiguous runs (`slicereader`: pread, no mmap, so only the shard is resident); one that is
not (none seen so far) reads that one tensor whole.

Anything this cannot describe exactly (no safetensors, a sharded parameter without a layout, a
name the checkpoint does not hold, a shape that differs) raises `NotShardable` before a byte is
read, and the caller loads the whole checkpoint as before, saying why.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dslaunch.engine.slicereader import SliceReader

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
META_ATTR = "ds_autotp_universal_checkpoint_meta"  # deepspeed.checkpoint.constants.DS_AUTOTP_UC_META

Progress = Callable[[int, int], None]  # (bytes read so far, bytes this rank will read)


class NotShardable(Exception):
    """Shard-only loading cannot describe this model exactly; load the whole checkpoint."""


def weight_files(path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    root = Path(path)
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    if (root / SINGLE).is_file():
        reader = SliceReader(root / SINGLE)
        reader.close()
        return dict.fromkeys(reader.tensors, root / SINGLE)
    raise NotShardable(f"no {SINGLE} or {INDEX} in {path}")


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device and keep their buffers real:
    rotary tables and position ids are computed by `__init__` and are not in the checkpoint."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_meta(auto_cls: Any, path: str, config: Any, dtype: Any) -> Any:
    """The model as `from_pretrained` builds it, with every parameter on the meta device."""
    from transformers.initialization import no_init_weights

    with meta_parameters(), no_init_weights():
        model = auto_cls.from_config(config, dtype=dtype)
        model.tie_weights()  # as from_pretrained does: a tied head is the embedding's own tensor
    import torch

    if dtype != torch.float32 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):  # fmt: skip
        raise NotShardable(f"{type(model).__name__} keeps some modules in fp32, as only from_pretrained knows")
    if getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        with contextlib.suppress(OSError):  # as from_pretrained: the directory's generation_config.json
            model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def aliases(model: Any) -> dict[str, list[str]]:
    """Every parameter name -> the names sharing its tensor (tied embeddings), itself first.
    Taken before sharding: AutoTP may untie them by slicing one and not the other."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    out = {name: [name, *(n for n in names if n != name)] for names in by_id.values() for name in names}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():  # {target: source}
        out.setdefault(target, [target]).append(source)
    return out


class Plan:
    """What this rank reads: for each parameter of the sharded model, its checkpoint name and the
    pieces of it (a box of the full tensor -> where it goes in the shard)."""

    def __init__(self, module: Any, names: dict[str, list[str]], keys: dict[str, str],
                 readers: dict[str, SliceReader], rank: int) -> None:  # fmt: skip
        self.module, self.readers, self.rank = module, readers, rank
        self.entries: list[tuple[str, str, Any, list[Any]]] = []  # (param name, key, param, pieces)
        for mod in module.modules():  # the layouts, on the parameters as they are now: DeepSpeed marks them
            mark = getattr(mod, "_mark_uc_metadata", None)  # when a layer is built, and a later step may
            if callable(mark):  # replace a parameter object (a dtype move) and drop the mark
                mark()
        seen: set[int] = set()
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = next((keys[n] for n in names.get(name, [name]) if n in keys), None)
            if key is None:
                raise NotShardable(f"the checkpoint holds no tensor for {name}")
            try:
                readers[key].itemsize(key)
            except ValueError as e:  # a dtype read here does not know
                raise NotShardable(str(e)) from None
            self.entries.append((name, key, p, self._pieces(name, p, readers[key].shape(key))))
        # in the checkpoint's bytes, as progress counts them
        self.total = sum(sum(math.prod(x.shape) for x in pieces) * readers[key].itemsize(key)
                         for _, key, _, pieces in self.entries)  # fmt: skip

    def _pieces(self, name: str, p: Any, full: tuple[int, ...]) -> list[Any]:
        meta = getattr(p, META_ATTR, None)
        if meta is None:  # not touched by AutoTP: the whole tensor, as it is in the checkpoint
            if tuple(p.shape) != full:
                raise NotShardable(f"{name} is {tuple(p.shape)} here and {full} in the checkpoint")
            return [_WholePiece(full)]
        affine = (meta.get("conversion") or {}).get("affine_map")
        if not affine:
            raise NotShardable(f"DeepSpeed records no layout for {name}")
        from deepspeed.checkpoint.affine import ParamAffineMap

        layout = ParamAffineMap.from_dict(affine)
        if tuple(layout.logical_shape) != full or tuple(layout.shard_shapes[self.rank]) != tuple(p.shape):
            raise NotShardable(f"{name}: DeepSpeed's layout does not match the checkpoint's {full}")
        return layout.pieces_by_rank[self.rank]

    def fill(self, progress: Progress | None = None) -> None:
        """Read every piece into its place in the parameter DeepSpeed allocated for this shard."""
        import torch

        done, last = 0, 0.0
        with torch.no_grad():
            for _name, key, p, pieces in self.entries:
                flat, reader = p.data.view(-1), self.readers[key]
                for piece in pieces:
                    done += math.prod(piece.shape) * reader.itemsize(key)
                    _fill(reader, key, piece, piece.dest_view(flat))
                if progress and time.monotonic() - last > 0.5:
                    progress(done, self.total)
                    last = time.monotonic()
        if progress:
            progress(done, self.total)


class _WholePiece:
    """The whole tensor, for a parameter every rank holds as the checkpoint has it."""

    scale = 1.0

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def dest_view(self, shard: Any) -> Any:
        return shard.view(self.shape)


def box(piece: Any, full: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The piece as a box of the full tensor (one slice per dimension), or None when its strides
    are not the full tensor's own (then only reading the tensor whole can serve it)."""
    strides = [math.prod(full[d + 1 :]) for d in range(len(full))]
    if len(piece.shape) != len(full) or any(
        n > 1 and s != want for n, s, want in zip(piece.shape, piece.source_strides, strides, strict=True)
    ):
        return None
    slices, rest = [], piece.source_offset
    for n, stride, size in zip(piece.shape, strides, full, strict=True):
        start, rest = divmod(rest, stride)
        if start + n > size:
            return None
        slices.append(slice(start, start + n))
    return tuple(slices)


def _fill(reader: SliceReader, key: str, piece: Any, dest: Any) -> None:
    """One piece into its place in the shard: read straight into it when it is a box, in the
    checkpoint's dtype, of contiguous CPU memory; else read, convert, scale and copy."""
    full = reader.shape(key)
    where = tuple(slice(0, n) for n in full) if isinstance(piece, _WholePiece) else box(piece, full)
    scale = getattr(piece, "scale", 1.0)
    same = dest.dtype == reader.torch_dtype(key) and scale == 1.0
    if where is not None and same and dest.is_contiguous() and dest.device.type == "cpu":
        reader.read_into(key, where, dest)
        return
    block = reader.read(key, where) if where is not None else piece.source_view(reader.read(key).reshape(-1))
    block = block.to(dest.dtype)
    dest.copy_(block * scale if scale != 1.0 else block)


def checkpoint_keys(model: Any, files: dict[str, Path]) -> dict[str, str]:
    """Model parameter name -> checkpoint tensor name, renamed as `from_pretrained` renames them
    (transformers' conversion mapping: legacy names, a model's renamed modules, the base model's
    prefix). A key that transformers converts (merges, splits, permutes) rules shard-only out."""
    wanted = dict.fromkeys(model.state_dict(), True)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: checkpoint names are the model's, give or take the prefix
        return {**{k: k for k in files}, **{f"{model.base_model_prefix}.{k}": k for k in files}}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    out: dict[str, str] = {}
    for key in files:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if converted is not None:
            raise NotShardable(f"transformers converts {key} as it loads it")
        out[name] = key
    return out


def load_sharded(auto_cls: Any, path: str, config: Any, dtype: Any, shard: Callable[[Any], Any],
                 rank: int, progress: Progress | None = None) -> Any:  # fmt: skip
    """Build on meta, shard with `shard` (AutoTP), read this rank's slices; the sharded module.
    Raises NotShardable (before reading any weight) when the checkpoint or the layout rules it out."""
    files = weight_files(path)
    model = build_meta(auto_cls, path, config, dtype)
    names, keys = aliases(model), checkpoint_keys(model, files)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    module = shard(model)  # AutoTP on meta decides every split; DeepSpeed then allocates each shard empty
    opened = {f: SliceReader(f) for f in set(files.values())}  # each file's header read once
    try:
        readers = {key: opened[f] for key, f in files.items()}
        plan = Plan(module, names, keys, readers, _tp_rank(module, rank))
        restore_buffers(module, buffers, keys, readers)
        plan.fill(progress)
    finally:
        for reader in opened.values():
            reader.close()
    size, read = sum(f.stat().st_size for f in opened), sum(r.bytes_read for r in opened.values())
    print(f"loaded this rank's shard only, from {path}: {read} of the checkpoint's {size} bytes read", flush=True)
    return module


def restore_buffers(module: Any, saved: dict[str, Any], keys: dict[str, str], readers: dict[str, SliceReader]) -> None:
    """Buffers as from_pretrained leaves them: the checkpoint's where it holds them, else as
    `__init__` computed them (DeepSpeed's allocation of the meta model left them uninitialised)."""
    import torch

    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in keys:
                buf.copy_(readers[keys[name]].read(keys[name]))
            elif name in saved:
                buf.copy_(saved[name])


def _tp_rank(module: Any, rank: int) -> int:
    """This rank's index in the tensor-parallel group, as AutoTP's layers hold it."""
    for mod in module.modules():
        index = getattr(mod, "tp_index", None)
        if isinstance(index, int):
            return index
    return rank
