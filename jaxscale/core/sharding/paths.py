"""Path rules: logical names for parameters the model does not annotate.

``sharding.param_rules`` is an ordered list of [regex, names] pairs. `annotate_params` boxes
every unannotated parameter with the names of the first pair whose regex `re.search`es its path
inside the params tree (``layers_0/mlp/wi/kernel``; no leading ``params/``). A parameter no pair
matches is replicated when it is small (at most ``sharding.replicate_below`` bytes: norms,
biases) and an error otherwise, so a large parameter is never silently copied to every device.

Replicated small parameters are boxed as `ReplicatedSmall`, an `nn.Partitioned` with all-None
names, so the sharding report can say why they are replicated (`replicated_small` lists them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxscale.core.sharding.rules import pad_names
from jaxscale.core.trees import path_str
from jaxscale.core.units import format_bytes
from jaxscale.errors import ShardingError

ParamRules = Sequence[Sequence[Any]]  # [[regex, [name | None, ...]], ...]


class ReplicatedSmall(nn.Partitioned):
    """A parameter that matched no ``sharding.param_rules`` entry and was replicated because it
    is at most ``sharding.replicate_below`` bytes. Its names are all None; anything that unboxes
    or reads names treats it as the `nn.Partitioned` it is."""


def is_box(x: Any) -> bool:
    """Whether `x` is a Flax partitioning box (`nn.Partitioned` or a subclass)."""
    return isinstance(x, nn.Partitioned)


def annotate_params(params: Any, param_rules: ParamRules, replicate_below: int, *,
                    hint: str = "") -> Any:
    """Box every unannotated parameter with logical names from the first matching path rule.

    Only paths and shapes are read, so this runs inside an init function under `jax.eval_shape`
    or `jax.jit` (the leaves may be tracers).

    Args:
      params: a pytree of arrays / ShapeDtypeStructs, some perhaps already boxed
        (`nn.Partitioned`, e.g. from `nn.with_logical_partitioning`); boxed leaves keep their
        names.
      param_rules: ordered [regex, names] pairs; the first regex that `re.search`es the leaf's
        "/"-joined path gives its names (fewer names than dimensions replicate the rest).
      replicate_below: an unmatched leaf of at most this many bytes is replicated.
      hint: appended to the error (e.g. "; or annotate it with nn.with_logical_partitioning").

    Returns:
      `params` with every leaf boxed: matched ones as `nn.Partitioned(value, names)`, small
      unmatched ones as `ReplicatedSmall` (all-None names).

    Raises:
      ShardingError: an unmatched leaf above `replicate_below` bytes (one line naming its path,
        shape and size), or a rule giving more names than the leaf has dimensions.

    Example::

        annotate_params({"mlp": {"wi": {"kernel": w}}}, [["wi/kernel", ["embed", "mlp"]]], 1024)
        # -> {"mlp": {"wi": {"kernel": nn.Partitioned(w, names=("embed", "mlp"))}}}
    """
    compiled = [(pattern, re.compile(pattern), tuple(names)) for pattern, names in param_rules]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    boxed = [leaf if is_box(leaf) else _box(path_str(path), leaf, compiled, replicate_below, hint)
             for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, boxed)


def _box(path: str, leaf: Any, compiled: list[tuple[str, re.Pattern, tuple]],
         replicate_below: int, hint: str) -> nn.Partitioned:
    shape = tuple(leaf.shape)
    for pattern, regex, names in compiled:
        if regex.search(path):
            what = f"parameter {path!r} (sharding.param_rules entry {pattern!r})"
            return nn.Partitioned(leaf, names=pad_names(names, shape, what=what))
    size = math.prod(shape) * np.dtype(leaf.dtype).itemsize
    if size <= replicate_below:
        return ReplicatedSmall(leaf, names=(None,) * len(shape))
    raise ShardingError(
        f"parameter {path!r} of shape {shape} ({format_bytes(size, digits=1)}) matches no "
        f"sharding.param_rules entry and is above sharding.replicate_below={replicate_below} "
        f'bytes; add a rule such as ["{path}", [<one logical name or null per dimension>]]'
        + hint
    )


def replicated_small(params: Any) -> list[str]:
    """Paths (inside `params`, "/"-joined) of the leaves `annotate_params` replicated for being
    small. `params` is the boxed tree it returned, or one holding it (a train state)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    return [path_str(path) for path, leaf in leaves if isinstance(leaf, ReplicatedSmall)]
