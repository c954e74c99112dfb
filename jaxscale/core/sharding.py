"""Logical sharding rules: the one place where logical axis names meet mesh axes.

Models name the dimensions of their parameters (``nn.with_logical_partitioning(init, ("embed",
"mlp"))``) and of their activations (``constrain(x, ("batch", "length", "act_embed"))``) by what
they mean. Rules map those names to mesh axes:

    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", None))

Rules are ordered and the first rule for a name wins. A rule whose mesh axes another dimension of
the same array already uses is passed over for the next rule for that name; with none left the
dimension is replicated. Every check is strict: a logical name with no rule, a rule naming a mesh
axis that does not exist, a dimension not divisible by its mesh axes, or a mesh axis larger than 1
that nothing is sharded over each raise a ShardingError that names the array.

Logical names used by jaxscale's models:
  parameters:  vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers
  activations: batch, length, act_embed, act_heads, act_kv_heads, act_head_dim, act_mlp, act_vocab
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import ConfigError, ShardingError

MeshAxes = Union[str, tuple[str, ...], None]  # noqa: UP007 (a runtime alias on 3.10)
LogicalRules = tuple[tuple[str, MeshAxes], ...]

# Mesh axes that carry the batch (data parallelism in its two flavours).
BATCH_AXES = ("data", "fsdp")


def _preset(param_axes: MeshAxes, tensor: MeshAxes) -> LogicalRules:
    """Rules for a preset: parameters' embed dim over `param_axes`, model dims over `tensor`."""
    return (
        # activations
        ("batch", BATCH_AXES),
        ("length", "sequence"),
        ("act_embed", None),
        ("act_heads", tensor),
        ("act_kv_heads", tensor),
        ("act_head_dim", None),
        ("act_mlp", tensor),
        ("act_vocab", tensor),
        # parameters
        ("layers", None),
        ("vocab", tensor),
        ("embed", param_axes),
        ("heads", tensor),
        ("kv_heads", tensor),
        ("head_dim", None),
        ("mlp", tensor),
        ("norm", None),
    )


# Presets by name. All shard the batch over (data, fsdp) and the length over sequence.
RULE_PRESETS: dict[str, LogicalRules] = {
    # Data parallel: parameters and optimizer state replicated.
    "dp": _preset(None, None),
    # Fully sharded data parallel: parameters sharded over every batch axis (ZeRO-3).
    "fsdp": _preset(BATCH_AXES, None),
    # Tensor parallel: heads, MLP and vocab split over tensor; the rest replicated.
    "tp": _preset(None, "tensor"),
    # FSDP over the batch axes and tensor parallelism within.
    "fsdp_tp": _preset(BATCH_AXES, "tensor"),
    # Hybrid sharded: sharded over fsdp, replicated over data (e.g. fsdp within a host/slice).
    "hsdp": _preset("fsdp", None),
}


def resolve_rules(rules: str | Sequence[Sequence[Any]]) -> LogicalRules:
    """Normalise a preset name or a list of [name, axes] pairs into a LogicalRules tuple."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            close = difflib.get_close_matches(rules, list(RULE_PRESETS), n=1)
            raise ConfigError(
                f"sharding.rules={rules!r} is not a preset; choose one of: "
                f"{', '.join(RULE_PRESETS)}" + (f" (did you mean '{close[0]}'?)" if close else "")
            )
        return RULE_PRESETS[rules]
    out = []
    for rule in rules:
        name, target = rule
        if isinstance(target, (list, tuple)):
            target = tuple(target) if len(target) != 1 else target[0]
        out.append((name, target))
    return tuple(out)


def axes_of(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def check_rules(rules: LogicalRules, mesh: Mesh) -> None:
    """Every mesh axis a rule names must exist in `mesh`."""
    for name, target in rules:
        for axis in axes_of(target):
            if axis not in mesh.axis_names:
                close = difflib.get_close_matches(axis, mesh.axis_names, n=1)
                raise ShardingError(
                    f"sharding rule {name!r} -> {axis!r} names a mesh axis that does not exist; "
                    f"mesh axes: {', '.join(mesh.axis_names)}"
                    + (f" (did you mean '{close[0]}'?)" if close else "")
                )


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: LogicalRules, *, what: str = "array"
) -> PartitionSpec:
    """Map one array's logical axis names to a PartitionSpec of mesh axes.

    Args:
      logical_axes: one logical name (or None = replicated) per dimension.
      rules: ordered (logical_name, mesh_axes) pairs; the first usable rule for a name wins.
      what: how to name the array in errors (e.g. "parameter 'layers/mlp/wi/kernel'").

    Raises:
      ShardingError: a logical name has no rule.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        targets = [target for rule_name, target in rules if rule_name == name]
        if not targets:
            known = sorted({rule_name for rule_name, _ in rules})
            close = difflib.get_close_matches(name, known, n=1)
            raise ShardingError(
                f"{what} has logical axis {name!r} but no sharding rule maps it; add a rule such "
                f"as [{name!r}, null] to sharding.rules"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
        chosen = next((t for t in targets if not used.intersection(axes_of(t))), None)
        used.update(axes_of(chosen))
        spec.append(chosen)
    return PartitionSpec(*spec)


def _check_divisible(
    shape: Sequence[int], spec: PartitionSpec, logical: Sequence[str | None], mesh: Mesh, what: str
) -> None:
    for dim, (size, target) in enumerate(zip(shape, spec, strict=True)):
        axes = axes_of(target)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            raise ShardingError(
                f"{what} of shape {tuple(shape)}: dimension {dim} (size {size}, logical "
                f"{logical[dim]!r}) is not divisible by mesh axes {axes} of total size {parts}"
            )


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: LogicalRules, shape: Sequence[int],
    *, what: str = "array",
) -> NamedSharding:
    """The NamedSharding of an array of `shape` with these logical axes (checked to divide)."""
    if len(logical_axes) != len(shape):
        raise ShardingError(
            f"{what} of shape {tuple(shape)} is annotated with {len(logical_axes)} logical axes "
            f"{tuple(logical_axes)}"
        )
    spec = logical_to_spec(logical_axes, rules, what=what)
    _check_divisible(shape, spec, logical_axes, mesh, what)
    return NamedSharding(mesh, spec)


# --------------------------------------------------------------------------------------------
# Activations.

_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = (
    contextvars.ContextVar("jaxscale_activation_sharding", default=None)
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: LogicalRules) -> Iterator[None]:
    """While tracing inside this context, `constrain` applies the rules on `mesh`.

    Flax's `nn.with_logical_constraint` sees the same rules, but resolves them only where an
    ambient mesh is set; models meant for jaxscale should call `constrain`, which needs none.
    """
    if mesh is None:
        yield
        return
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        with nn.logical_axis_rules(rules):
            yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside `activation_sharding`.

    Example: ``x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))``.
    """
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    what = f"activation {tuple(logical_axes)}"
    sharding = named_sharding(mesh, logical_axes, rules, x.shape, what=what)
    return jax.lax.with_sharding_constraint(x, sharding)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array: batch and length axes by the rules."""
    logical = ("batch", "length")[:ndim] + (None,) * max(0, ndim - 2)
    return NamedSharding(mesh, logical_to_spec(logical, rules, what="the batch"))


# --------------------------------------------------------------------------------------------
# Whole-state shardings.


class LogicalAxes(tuple):
    """One array's logical axis names. A tuple subclass, so jax treats it as a pytree leaf."""


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def path_str(path: Sequence[Any]) -> str:
    """'params/layers/attn/query/kernel' for a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes_of(abstract_state: Any) -> Any:
    """Logical axes (a tuple per leaf) of a state whose parameters are boxed by Flax.

    Leaves boxed with `nn.with_logical_partitioning` carry their names. Any other leaf whose key
    path ends with the path of a boxed leaf (optimizer moments: ``.../mu/layers/mlp/wi/kernel``)
    takes that parameter's names when its shape matches, or the names minus one dimension when
    it is a factored moment (Adafactor's row/column statistics). Everything else is replicated.

    Returns:
      The unboxed structure of `abstract_state` with a LogicalAxes (names or Nones) per leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=_is_box)
    # Index boxed leaves by every suffix of their path, so a moment can find its parameter.
    by_suffix: dict[tuple, tuple[tuple, tuple]] = {}
    for path, leaf in leaves:
        if _is_box(leaf):
            keys = tuple(path_str([k]) for k in path)
            for start in range(len(keys)):
                by_suffix.setdefault(keys[start:], (tuple(leaf.names), tuple(leaf.value.shape)))

    def lookup(path, leaf) -> tuple:
        if _is_box(leaf):
            return tuple(leaf.names)
        return _match(path, leaf)

    def _match(path, leaf) -> tuple:
        shape = tuple(getattr(leaf, "shape", ()))
        keys = tuple(path_str([k]) for k in path)
        for start in range(len(keys)):
            hit = by_suffix.get(keys[start:])
            if hit is None:
                continue
            names, param_shape = hit
            if shape == param_shape:
                return names
            if len(shape) == len(param_shape) - 1:
                for drop in reversed(range(len(param_shape))):
                    if param_shape[:drop] + param_shape[drop + 1:] == shape:
                        return names[:drop] + names[drop + 1:]
            break
        return (None,) * len(shape)

    return jax.tree_util.tree_unflatten(treedef, [LogicalAxes(lookup(p, x)) for p, x in leaves])


def _unboxed_leaves(abstract_state: Any) -> tuple[list[tuple[Any, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=_is_box)
    return [(p, x.value if _is_box(x) else x) for p, x in leaves], treedef


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for every leaf of a (boxed, abstract) train state.

    Args:
      abstract_state: e.g. `jax.eval_shape(init_fn)` where the parameters are still boxed with
        their logical names (see `state.make_init_fn`).
      mesh: the device mesh.
      rules: logical rules (see `resolve_rules`).

    Returns:
      The unboxed structure of the state with a NamedSharding per leaf.

    Raises:
      ShardingError: unknown logical name, unknown mesh axis, non-divisible dimension, or a mesh
        axis larger than 1 that no parameter and not the batch is sharded over.
    """
    leaves, logical, shardings, treedef = _resolve_state(abstract_state, mesh, rules)
    return jax.tree_util.tree_unflatten(treedef, shardings)


def _resolve_state(abstract_state: Any, mesh: Mesh, rules: LogicalRules):
    """(unboxed (path, leaf) pairs, logical axes, NamedShardings, treedef), all checks applied."""
    check_rules(rules, mesh)
    logical = jax.tree_util.tree_leaves(logical_axes_of(abstract_state))
    leaves, treedef = _unboxed_leaves(abstract_state)
    shardings = []
    for (path, leaf), names in zip(leaves, logical, strict=True):
        what = f"parameter {path_str(path)!r}" if any(names) else f"state leaf {path_str(path)!r}"
        shardings.append(named_sharding(mesh, names, rules, leaf.shape, what=what))
    _check_mesh_used(mesh, rules, shardings)
    return leaves, logical, shardings, treedef


def _check_mesh_used(mesh: Mesh, rules: LogicalRules, shardings: list[NamedSharding]) -> None:
    used = set(_axes_in_spec(batch_sharding(mesh, rules).spec))
    for s in shardings:
        used.update(_axes_in_spec(s.spec))
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in used:
            raise ShardingError(
                f"mesh axis {axis!r} has size {size} but neither the batch nor any parameter is "
                f"sharded over it, so its devices would all compute the same thing; set "
                f"mesh.{axis}=1 or add a sharding rule that uses {axis!r}"
            )


def _axes_in_spec(spec: PartitionSpec) -> Iterator[str]:
    for target in spec:
        yield from axes_of(target)


# --------------------------------------------------------------------------------------------
# Report.


@dataclass(frozen=True)
class ReportRow:
    path: str  # key path in the train state
    shape: tuple[int, ...]  # global shape
    dtype: str  # element type
    logical: tuple[str | None, ...]  # logical axis names
    spec: PartitionSpec  # mesh axes per dimension
    bytes_per_device: int  # bytes of one device's shard
    total_bytes: int  # bytes of the whole array


def bytes_per_device(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def sharding_report(abstract_state: Any, mesh: Mesh, rules: LogicalRules) -> list[ReportRow]:
    """One row per leaf of the train state: path, shape, logical axes, spec, bytes per device."""
    leaves, logical, shardings, _ = _resolve_state(abstract_state, mesh, rules)
    rows = []
    for (path, leaf), names, sharding in zip(leaves, logical, shardings, strict=True):
        rows.append(ReportRow(
            path=path_str(path), shape=tuple(leaf.shape), dtype=str(np.dtype(leaf.dtype)),
            logical=names, spec=sharding.spec,
            bytes_per_device=bytes_per_device(leaf.shape, leaf.dtype, sharding),
            total_bytes=math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize,
        ))
    return rows


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(rows: Sequence[ReportRow]) -> str:
    """The report as an aligned text table with a total line."""
    header = ("path", "shape", "dtype", "logical axes", "partition spec", "bytes/device")
    body = [
        (r.path, "x".join(map(str, r.shape)) or "()", r.dtype,
         "(" + ", ".join(str(n) for n in r.logical) + ")",
         str(tuple(r.spec)), format_bytes(r.bytes_per_device))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    total = sum(r.bytes_per_device for r in rows)
    whole = sum(r.total_bytes for r in rows)
    lines.append(f"total: {format_bytes(total)} per device ({format_bytes(whole)} unsharded)")
    return "\n".join(lines)
