"""The sharding report (`jaxscale inspect`): per state leaf its logical names, the rule each
dimension took, its PartitionSpec and its bytes per device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.core.sharding.paths import ReplicatedSmall
from jaxscale.core.sharding.rules import LogicalName, LogicalRules, MeshAxes
from jaxscale.core.sharding.state import resolve_state
from jaxscale.core.units import format_bytes

# The `rule` of a parameter `annotate_params` replicated for being small (and of its moments).
REPLICATED_SMALL = "(replicated: below replicate_below)"


@dataclass(frozen=True)
class ReportRow:
    path: str  # key path in the train state
    shape: tuple[int, ...]  # global shape
    dtype: str  # element type
    logical: tuple[LogicalName, ...]  # logical axis names
    spec: PartitionSpec  # mesh axes per dimension
    bytes_per_device: int  # bytes of one device's shard
    total_bytes: int  # bytes of the whole array
    # The mesh axes each named dimension took, e.g. "embed->fsdp, mlp->tensor" ("replicated" if
    # none); REPLICATED_SMALL for an unannotated parameter below sharding.replicate_below (and
    # its moments); "" for a leaf without names (step counters).
    rule: str = ""
    replicated_small: bool = False  # replicated because small and matched by no param_rules


def bytes_per_device(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of an array of `shape` and `dtype` under `sharding`."""
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def _axes_text(target: MeshAxes) -> str:
    return target if isinstance(target, str) else "(" + ", ".join(target) + ")"


def rule_text(logical: Sequence[LogicalName], spec: PartitionSpec) -> str:
    """'name->mesh axes' for every dimension sharded over some: ``"embed->fsdp, mlp->tensor"``;
    "replicated" for a leaf with names but no sharded dimension, "" for one without names."""
    taken = [f"{name if isinstance(name, str) else '+'.join(name)}->{_axes_text(target)}"
             for name, target in zip(logical, spec, strict=True)
             if name is not None and target is not None]
    if taken:
        return ", ".join(taken)
    return "replicated" if any(name is not None for name in logical) else ""


def sharding_report(abstract_state: Any, mesh: Mesh, rules: LogicalRules, *,
                    batch_names: Sequence[str] = ()) -> list[ReportRow]:
    """One row per leaf of the train state: path, shape, logical axes, spec, bytes per device and
    the rule each dimension took. Raises what `state_shardings` raises."""
    leaves, _ = resolve_state(abstract_state, mesh, rules, batch_names=batch_names)
    rows = []
    for leaf in leaves:
        small = isinstance(leaf.source, ReplicatedSmall)
        value = leaf.value
        rows.append(ReportRow(
            path=leaf.path, shape=tuple(value.shape), dtype=str(np.dtype(value.dtype)),
            logical=leaf.logical, spec=leaf.sharding.spec,
            bytes_per_device=bytes_per_device(value.shape, value.dtype, leaf.sharding),
            total_bytes=leaf.nbytes,
            rule=REPLICATED_SMALL if small else rule_text(leaf.logical, leaf.sharding.spec),
            replicated_small=small,
        ))
    return rows


def format_report(rows: Sequence[ReportRow]) -> str:
    """The report as an aligned text table with a total line."""
    header = ("path", "shape", "dtype", "logical axes", "partition spec", "rules", "bytes/device")
    body = [
        (r.path, "x".join(map(str, r.shape)) or "()", r.dtype,
         "(" + ", ".join(str(n) for n in r.logical) + ")",
         str(tuple(r.spec)), r.rule, format_bytes(r.bytes_per_device))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    total = sum(r.bytes_per_device for r in rows)
    whole = sum(r.total_bytes for r in rows)
    lines.append(f"total: {format_bytes(total)} per device ({format_bytes(whole)} unsharded)")
    return "\n".join(lines)
