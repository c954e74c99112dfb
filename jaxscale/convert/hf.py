"""Hugging Face safetensors checkpoints: sharded loading into jax arrays, and writing.

Loading never materialises a whole parameter on the host unless a device holds all of it: every
leaf is built with `jax.make_array_from_callback`, and the callback for one device's shard reads
just that slice of the tensor (`safe_open(...).get_slice(name)[...]`), mapped back through the
layout (`layout.Tensor.read`: transposes, [N*H] -> [N, H], fused c_attn blocks) and, for the
scanned layer stack, once per layer in the shard. Single files (model.safetensors) and sharded
ones (model.safetensors.index.json and its weight_map) read the same way; bfloat16 tensors come
back as ml_dtypes' bfloat16, so their bits are kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_dtypes  # noqa: F401 (registers "bfloat16" with numpy, which safetensors asks for)
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from jaxscale.config import ModelConfig
from jaxscale.convert.architectures import (
    ARCHITECTURES,
    BUFFER_SUFFIXES,
    Architecture,
    model_config_from_hf,
)
from jaxscale.convert.hf_config import CONFIG_FILE, check_model, describe, read_hf_config
from jaxscale.convert.layout import Tensor, join
from jaxscale.core.trees import path_str
from jaxscale.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"layers_(\d+)")


# --------------------------------------------------------------------------------------------
# Which parameter reads which tensor.


class Source(NamedTuple):
    """Where one parameter leaf comes from."""

    path: str  # the parameter's path, "layers/attn/query/kernel"
    tensor: Tensor
    layers: range | None  # the scanned stack's layers (leading dimension); None: no stack
    layer: int | None  # the one layer of an unrolled block ("layers_3/..."); None: top level

    def name(self, i: int | None = None) -> str:
        return self.tensor.name.format(i=self.layer if i is None else i)

    def names(self) -> list[str]:
        if self.tensor.absent:
            return []
        return [self.name(i) for i in self.layers] if self.layers is not None else [self.name()]

    def layer_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[1:]) if self.layers is not None else tuple(shape)


def sources(arch: Architecture, model: ModelConfig, params: Any,
            names: Sequence[str] = ()) -> list[tuple[Source, Any]]:
    """(Source, leaf) for every leaf of an (unboxed) parameter tree, scanned or unrolled.

    Raises:
      CheckpointError: a parameter the architecture has no tensor for.
    """
    top, layer = arch.tensors(model, names)
    out = []
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key)
        head, _, rest = path.partition("/")
        unrolled = _LAYER.fullmatch(head)
        if path in top:
            source = Source(path, top[path], None, None)
        elif head == "layers" and rest in layer:
            source = Source(path, layer[rest], range(leaf.shape[0]), None)
        elif unrolled and rest in layer:
            source = Source(path, layer[rest], None, int(unrolled.group(1)))
        else:
            raise CheckpointError(f"parameter {path!r} has no {arch.name} tensor")
        out.append((source, leaf))
    return out


# --------------------------------------------------------------------------------------------
# Reading.


def tensor_files(hf_dir: str | pathlib.Path, where: str) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (from the index, or the single file)."""
    root = pathlib.Path(hf_dir)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text()).get("weight_map", {})
        return {name: root / file for name, file in weight_map.items()}
    if (root / SINGLE_FILE).is_file():
        with safe_open(str(root / SINGLE_FILE), framework="numpy") as f:
            return dict.fromkeys(f.keys(), root / SINGLE_FILE)
    raise CheckpointError(f"{where} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                          "checkpoints are read: save_pretrained(..., safe_serialization=True))")


class _Files:
    """The checkpoint's safetensors files, each opened once on first use."""

    def __init__(self, files: dict[str, pathlib.Path], stack: contextlib.ExitStack, where: str):
        self.files, self._stack, self._open, self._where = files, stack, {}, where

    def slice(self, name: str) -> Any:
        path = self.files[name]
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{self._where}: {path.name}, which the index names for "
                                      f"{name!r}, does not exist")
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
        return self._open[path].get_slice(name)


def _check_tensors(found: list[tuple[Source, Any]], files: _Files, arch: Architecture,
                   where: str) -> None:
    """Every tensor the parameters need exists with the expected shape; every parameter tensor
    the checkpoint holds is used."""
    used = set()
    for source, leaf in found:
        expected = source.tensor.hf_shape(source.layer_shape(leaf.shape))
        for name in source.names():
            if name not in files.files:
                raise CheckpointError(f"{where}: tensor {name!r} is missing (parameter "
                                      f"{source.path!r} reads it)")
            shape = tuple(files.slice(name).get_shape())
            if shape != expected:
                raise CheckpointError(
                    f"{where}: tensor {name!r} has shape {list(shape)} but the model expects "
                    f"{list(expected)} (parameter {source.path!r})")
            used.add(name)
    for name in sorted(set(files.files) - used):
        tied_head = name == "lm_head.weight"  # tied checkpoints may still carry it
        if not (tied_head or name.endswith(BUFFER_SUFFIXES)):
            raise CheckpointError(f"{where}: tensor {name!r} has no place in the {arch.name} "
                                  f"model its {CONFIG_FILE} describes")


def _callback(source: Source, shape: tuple[int, ...], dtype: Any,
              files: _Files) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """index -> that slice of the parameter, read from the checkpoint (once per distinct
    index: replicas of a shard share the read)."""
    cache: dict[tuple, np.ndarray] = {}
    layer_shape = source.layer_shape(shape)

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        return source.tensor.read(layer_shape, index, lambda hf_index: files.slice(name)[hf_index])

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if key not in cache:
            if source.tensor.absent:
                x = np.zeros([hi - lo for lo, hi in key])
            elif source.layers is None:
                x = read(source.name(), index)
            else:
                x = np.stack([read(source.name(i), index[1:])
                              for i in range(*index[0].indices(shape[0])[:2])])
            cache[key] = np.asarray(x, dtype=dtype)
        return cache[key]

    return callback


def load_hf_params(hf_dir: str | pathlib.Path, abstract_params: Any, shardings: Any, *,
                   model: ModelConfig | None = None, what: str = "") -> Any:
    """The parameters of a Hugging Face checkpoint, as jax arrays placed with `shardings`.

    Args:
      hf_dir: a directory with config.json and model.safetensors (or an index and its shards).
      abstract_params: the model's parameter shapes (`jax.eval_shape` of its init; boxed or
        not), scanned or unrolled layers.
      shardings: a NamedSharding per parameter leaf.
      model: the run's model config; when given, it must describe the checkpoint's model
        (`hf_config.first_difference`), else a CheckpointError names the first differing field.
      what: how errors name the directory's setting (e.g. "checkpoint.init_from").

    Returns:
      The parameter tree, each leaf in the abstract leaf's dtype; each device's shard was read
      on its own from the file (see the module docstring).

    Raises:
      CheckpointError: no directory, config.json or safetensors; a missing tensor, one of
        another shape, or one the model has no place for (each named).
      ConfigError: an architecture or setting jaxscale does not support.
    """
    hf_dir = pathlib.Path(hf_dir)
    where = describe(hf_dir, what)
    hf = read_hf_config(hf_dir, what)
    hf_model, extra = model_config_from_hf(hf, str(hf_dir / CONFIG_FILE))
    if model is not None:
        check_model(hf_model, model, where)
    arch = ARCHITECTURES[extra["architecture"]]
    params = nn.unbox(abstract_params)
    with contextlib.ExitStack() as stack:
        files = _Files(tensor_files(hf_dir, where), stack, where)
        found = sources(arch, hf_model, params, list(files.files))
        _check_tensors(found, files, arch, where)
        leaves = [
            jax.make_array_from_callback(
                tuple(leaf.shape), sharding,
                _callback(source, tuple(leaf.shape), leaf.dtype, files))
            for (source, leaf), sharding in zip(found, jax.tree_util.tree_leaves(shardings),
                                                strict=True)
        ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


# --------------------------------------------------------------------------------------------
# Writing.


class HFTensor(NamedTuple):
    """One tensor to write: its name, shape, dtype and how to get its values (on the host)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    values: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def hf_tensors(found: list[tuple[Source, Any]]) -> list[HFTensor]:
    """The checkpoint's tensors for `sources(...)` of live (jax) parameters: one per name,
    fused blocks joined, each fetched from the devices only when written.

    Raises:
      CheckpointError: an `absent` parameter (the lm_head bias) that is not zero.
    """
    parts: dict[str, list[tuple[Tensor, Any, int | None]]] = {}
    for source, leaf in found:
        if source.tensor.absent:
            if np.any(_host(leaf, None)):
                raise CheckpointError(f"parameter {source.path!r} is not zero, and Hugging "
                                      "Face's model has no such tensor (its lm_head has no bias)")
            continue
        layers = list(source.layers) if source.layers is not None else [None]
        for i, name in zip(layers, source.names(), strict=True):
            parts.setdefault(name, []).append((source.tensor, leaf, i))
    out = []
    for name, pieces in parts.items():
        tensor, leaf, i = pieces[0]
        shape = tensor.hf_shape(leaf.shape[1:] if i is not None else leaf.shape)

        def values(pieces=pieces):
            return join([(t, _host(x, i)) for t, x, i in pieces])

        out.append(HFTensor(name, shape, np.dtype(leaf.dtype), values))
    return out


def _host(x: jax.Array, layer: int | None) -> np.ndarray:
    # One layer of a stacked leaf: slicing on the devices first gathers just that layer.
    return np.asarray(jax.device_get(x if layer is None else x[layer]))


def _shards(tensors: Sequence[HFTensor], max_bytes: int) -> list[list[HFTensor]]:
    groups: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def atomic_write(path: pathlib.Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def write_safetensors(out_dir: str | pathlib.Path, tensors: Sequence[HFTensor], *,
                      max_shard_bytes: int) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000k-of-0000n.safetensors shards and
    model.safetensors.index.json when they total more than `max_shard_bytes` (no tensor is
    split). Every file is written under a temporary name and renamed; the index comes last.
    Earlier model*.safetensors files and index of `out_dir` are removed. Returns the files."""
    out = pathlib.Path(out_dir)
    groups = _shards(tensors, max_shard_bytes)
    n = len(groups)
    files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                          for k in range(n)]
    for file, group in zip(files, groups, strict=True):
        arrays = {t.name: t.values() for t in group}
        for t in group:
            if arrays[t.name].shape != t.shape or arrays[t.name].dtype != t.dtype:
                raise AssertionError(f"{t.name}: {arrays[t.name].shape} {arrays[t.name].dtype}")
        atomic_write(out / file, lambda tmp, arrays=arrays: safetensors.numpy.save_file(
            arrays, tmp, metadata={"format": "pt"}))
    written = list(files)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: f for f, g in zip(files, groups, strict=True) for t in g}}
        atomic_write(out / INDEX_FILE, lambda tmp: pathlib.Path(tmp).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"))
        written.append(INDEX_FILE)
    for stale in _model_files(out):
        if stale.name not in written:
            stale.unlink()
    return written


def _model_files(root: pathlib.Path) -> Iterator[pathlib.Path]:
    yield from root.glob("model*.safetensors")
    if (root / INDEX_FILE).exists():
        yield root / INDEX_FILE
