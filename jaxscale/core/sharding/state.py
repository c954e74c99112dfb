"""Whole-state shardings: logical names of every train-state leaf, their NamedShardings, and the
check that every mesh axis larger than 1 does some work."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.core.sharding.paths import is_box
from jaxscale.core.sharding.rules import (
    LogicalName,
    LogicalRules,
    axes_of,
    batch_sharding,
    check_rules,
    is_activation_name,
    named_sharding,
)
from jaxscale.core.trees import path_str
from jaxscale.core.units import format_bytes
from jaxscale.errors import ShardingError

# The train state's field (or a state dict's key) that holds the parameters.
PARAMS_KEY = "params"


class LogicalAxes(tuple):
    """One array's logical axis names. A tuple subclass, so jax treats it as a pytree leaf."""


@dataclass(frozen=True)
class ResolvedLeaf:
    """One leaf of a train state with everything the checks and the report need."""

    path: str  # "/"-joined key path in the state
    value: Any  # the unboxed leaf (array or ShapeDtypeStruct)
    logical: tuple[LogicalName, ...]  # its logical names, one per dimension
    source: nn.Partitioned | None  # the parameter box the names come from (its own or matched)
    is_param: bool  # a parameter (boxed, or under the state's "params"), not optimizer state
    sharding: NamedSharding | None = None  # filled in by `resolve_state`

    @property
    def nbytes(self) -> int:
        return math.prod(self.value.shape) * np.dtype(self.value.dtype).itemsize


def _pad(names: Sequence[LogicalName], ndim: int) -> tuple[LogicalName, ...]:
    # Shorter annotations replicate the trailing dims; longer ones are left for named_sharding
    # to reject with the array's name.
    return tuple(names) + (None,) * max(0, ndim - len(names))


def _leaves(abstract_state: Any) -> tuple[list[ResolvedLeaf], Any]:
    """Every leaf with its names (before sharding), and the unboxed treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=is_box)
    # Index boxed leaves by every suffix of their path, so a moment can find its parameter.
    by_suffix: dict[tuple, nn.Partitioned] = {}
    for path, leaf in flat:
        if is_box(leaf):
            keys = tuple(path_str([k]) for k in path)
            for start in range(len(keys)):
                by_suffix.setdefault(keys[start:], leaf)

    def resolve(path, leaf) -> ResolvedLeaf:
        where = path_str(path)
        in_params = bool(path) and path_str(path[:1]) == PARAMS_KEY
        if is_box(leaf):
            names = _pad(leaf.names, len(leaf.value.shape))
            return ResolvedLeaf(where, leaf.value, names, leaf, True)
        names, source = _match(path, leaf)
        return ResolvedLeaf(where, leaf, names, source, in_params)

    def _match(path, leaf) -> tuple[tuple, nn.Partitioned | None]:
        shape = tuple(getattr(leaf, "shape", ()))
        keys = tuple(path_str([k]) for k in path)
        for start in range(len(keys)):
            box = by_suffix.get(keys[start:])
            if box is None:
                continue
            param_shape = tuple(box.value.shape)
            names = _pad(box.names, len(param_shape))
            if shape == param_shape:
                return names, box
            if len(shape) == len(param_shape) - 1:
                # A factored moment (Adafactor's row/column statistics): drop one dimension.
                for drop in reversed(range(len(param_shape))):
                    if param_shape[:drop] + param_shape[drop + 1:] == shape:
                        return names[:drop] + names[drop + 1:], box
            break
        return (None,) * len(shape), None

    return [resolve(p, x) for p, x in flat], treedef


def logical_axes_of(abstract_state: Any) -> Any:
    """Logical axes (a tuple per leaf) of a state whose parameters are boxed by Flax.

    Leaves boxed with `nn.with_logical_partitioning` (or by `annotate_params`) carry their names,
    padded with None to their rank. Any other leaf whose key path ends with the path of a boxed
    leaf (optimizer moments: ``.../mu/layers/mlp/wi/kernel``) takes that parameter's names when
    its shape matches, or the names minus one dimension when it is a factored moment (Adafactor's
    row/column statistics). Everything else is replicated.

    Returns:
      The unboxed structure of `abstract_state` with a LogicalAxes (names or Nones) per leaf.
    """
    leaves, treedef = _leaves(abstract_state)
    return jax.tree_util.tree_unflatten(treedef, [LogicalAxes(x.logical) for x in leaves])


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules, *,
                    batch_names: Sequence[str] = ()) -> Any:
    """NamedShardings for every leaf of a (boxed, abstract) train state.

    Args:
      abstract_state: e.g. `jax.eval_shape(init_fn)` where the parameters are still boxed with
        their logical names (see `state.make_init_fn`).
      mesh: the device mesh.
      rules: logical rules (see `resolve_rules`).
      batch_names: logical names of the task's batch dimensions (e.g. "height"); with "batch",
        "length" and the "act_*" names they are not parameter names (see the check below).

    Returns:
      The unboxed structure of the state with a NamedSharding per leaf.

    Raises:
      ShardingError: unknown logical name, unknown mesh axis, non-divisible dimension, a mesh
        axis larger than 1 that no parameter and not the batch is sharded over, or one that the
        rules map parameter names to but no parameter is sharded over (an unannotated model on
        ``mesh.fsdp=8`` would otherwise silently run as data parallelism).
    """
    leaves, treedef = resolve_state(abstract_state, mesh, rules, batch_names=batch_names)
    return jax.tree_util.tree_unflatten(treedef, [x.sharding for x in leaves])


def resolve_state(abstract_state: Any, mesh: Mesh, rules: LogicalRules, *,
                  batch_names: Sequence[str] = ()) -> tuple[list[ResolvedLeaf], Any]:
    """Every leaf of the state with its sharding, and the unboxed treedef; all checks applied."""
    check_rules(rules, mesh)
    leaves, treedef = _leaves(abstract_state)
    resolved = []
    for leaf in leaves:
        what = f"{'parameter' if any(leaf.logical) else 'state leaf'} {leaf.path!r}"
        sharding = named_sharding(mesh, leaf.logical, rules, leaf.value.shape, what=what)
        resolved.append(ResolvedLeaf(leaf.path, leaf.value, leaf.logical, leaf.source,
                                     leaf.is_param, sharding))
    _check_mesh_used(mesh, rules, resolved, batch_names)
    return resolved, treedef


# The way out the parameter-axis error offers, by mesh axis (default: the data axis).
_DATA_PARALLEL_HINT = {"data": "sharding.rules=dp"}


def _check_mesh_used(mesh: Mesh, rules: LogicalRules, leaves: Sequence[ResolvedLeaf],
                     batch_names: Sequence[str]) -> None:
    used = set(_axes_in_spec(batch_sharding(mesh, rules).spec))
    for leaf in leaves:
        used.update(_axes_in_spec(leaf.sharding.spec))
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in used:
            raise ShardingError(
                f"mesh axis {axis!r} has size {size} but neither the batch nor any parameter is "
                f"sharded over it, so its devices would all compute the same thing; set "
                f"mesh.{axis}=1 or add a sharding rule that uses {axis!r}"
            )
    params = [leaf for leaf in leaves if leaf.is_param]
    if not params:
        return
    param_axes = {a for leaf in params for a in _axes_in_spec(leaf.sharding.spec)}
    for axis, size in mesh.shape.items():
        if size <= 1 or axis in param_axes:
            continue
        names = [name for name, target in rules
                 if axis in axes_of(target) and not is_activation_name(name, batch_names)]
        if names:
            total = format_bytes(sum(leaf.nbytes for leaf in params), digits=1)
            way_out = _DATA_PARALLEL_HINT.get(axis, "mesh.data")
            raise ShardingError(
                f"mesh axis {axis!r} has size {size} and sharding rules map parameter names to "
                f"it ({', '.join(dict.fromkeys(names))}), but no parameter is sharded over it: "
                f"all {total} of parameters are replicated on its devices; annotate the model's "
                f"parameters (nn.with_logical_partitioning), give sharding.param_rules, or use "
                f"{way_out} for plain data parallelism"
            )


def _axes_in_spec(spec: PartitionSpec) -> Iterator[str]:
    for target in spec:
        yield from axes_of(target)
