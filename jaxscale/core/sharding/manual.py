"""Per-device code under the sharding rules: `shard_map` over the mesh the rules apply to.

Most of jaxscale leaves partitioning to the compiler and only constrains shardings by logical
names. Where a collective must be chosen by hand (ring attention's permutes, the experts'
all-to-all), code runs per device under `shard_map`, with its in/out specs derived from the same
logical names and rules; `spec_axes` tells it which mesh axes a dimension is split over, so no
mesh axis name is written outside the rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxscale.core.sharding.rules import (  # noqa: F401 (current_context is re-exported)
    LogicalName,
    LogicalRules,
    axes_of,
    current_context,
    logical_to_spec,
)

_SHARD_MAP = getattr(jax, "shard_map", None)
if _SHARD_MAP is None:  # older jax: the experimental module
    from jax.experimental.shard_map import shard_map as _SHARD_MAP
_PARAMETERS = inspect.signature(_SHARD_MAP).parameters
_CHECK_KEYWORD = "check_vma" if "check_vma" in _PARAMETERS else "check_rep"


def spec_axes(logical_axes: Sequence[LogicalName], rules: LogicalRules,
              mesh: Mesh) -> tuple[tuple[str, ...], ...]:
    """Per dimension, the mesh axes of size > 1 that the rules split it over."""
    spec = logical_to_spec(logical_axes, rules, what=f"array {tuple(logical_axes)}",
                           mesh_axis_names=mesh.axis_names)
    return tuple(tuple(a for a in axes_of(entry) if mesh.shape[a] > 1) for entry in spec)


def partition_spec(axes: Sequence[tuple[str, ...]]) -> PartitionSpec:
    """The PartitionSpec of dimensions split over these axes (as `spec_axes` returns them)."""
    return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else tuple(a) for a in axes))


def shard_map(fn: Callable, mesh: Mesh, *, in_specs: Any, out_specs: Any,
              check: bool = False, axis_names: set[str] | None = None) -> Callable:
    """`jax.shard_map` over the axes of `mesh`, on any supported jax version.

    Args:
      check: the replication/varying-axes check of shard_map (off by default: the callers here
        reduce explicitly).
      axis_names: the axes run by hand (default: all); the others stay with the compiler, so
        arrays inside keep their shardings over them and sharding constraints still apply.
    """
    keywords: dict[str, Any] = {_CHECK_KEYWORD: check}
    if axis_names is not None and set(axis_names) != set(mesh.axis_names):
        if "axis_names" in _PARAMETERS:
            keywords["axis_names"] = set(axis_names)
        else:  # the experimental module names the complement
            keywords["auto"] = frozenset(mesh.axis_names) - set(axis_names)
    return _SHARD_MAP(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **keywords)
