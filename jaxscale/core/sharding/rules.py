"""Rules: presets, `resolve_rules`, logical names -> PartitionSpec, activation and batch shardings.

Rules are ordered (logical_name, mesh_axes) pairs; the first rule for a name wins. A rule whose
mesh axes another dimension of the same array already uses is passed over for the next rule for
that name; with none left the dimension is replicated. Two conventions follow Flax:

- an annotation shorter than the array's rank replicates the trailing dimensions;
- a name no rule maps that is itself a mesh axis name maps to that axis (``nn.with_partitioning(
  init, ("fsdp", "tensor"))`` names mesh axes directly).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.core.sharding.auto import AUTO_RULES, auto_rules
from jaxscale.errors import ConfigError, ShardingError

MeshAxes = Union[str, tuple[str, ...], None]  # noqa: UP007 (a runtime alias on 3.10)
LogicalRules = tuple[tuple[str, MeshAxes], ...]
# One dimension's annotation: a logical name, mesh axis names (nn.with_partitioning), or None.
LogicalName = Union[str, tuple[str, ...], None]  # noqa: UP007

# Mesh axes that carry the batch in the presets (data parallelism in its two flavours).
BATCH_AXES = ("data", "fsdp")
# Logical names of activations (not parameters), besides those starting with ACTIVATION_PREFIX
# and the names of a task's batch fields.
ACTIVATION_NAMES = ("batch", "length")
ACTIVATION_PREFIX = "act_"


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
        ("act_expert", "expert"),
        ("act_expert_batch", BATCH_AXES),
        # images: spatial dimensions and input channels stay whole
        ("height", None),
        ("width", None),
        ("channels", None),
        # parameters
        ("layers", None),
        ("vocab", tensor),
        ("embed", param_axes),
        ("heads", tensor),
        ("kv_heads", tensor),
        ("head_dim", None),
        ("mlp", tensor),
        ("norm", None),
        ("expert", "expert"),
        # convolution kernels [kh, kw, conv_in, conv_out], like embed and mlp
        ("conv_in", param_axes),
        ("conv_out", tensor),
    )


# Rule sets by name. "auto" is the full table of `auto.AUTO_RULES`; `resolve_rules("auto", mesh)`
# drops the mesh's size-1 axes from it. The others are presets for explicit control, each
# sharding the batch over (data, fsdp) and the length over sequence.
RULE_PRESETS: dict[str, LogicalRules] = {
    # Every mesh axis used wherever it fits (see auto.py).
    "auto": AUTO_RULES,
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
# Rule sets resolved by a function of the mesh rather than looked up.
_BY_MESH = {"auto": auto_rules}


def resolve_rules(rules: str | Sequence[Sequence[Any]], mesh: Mesh | None = None) -> LogicalRules:
    """Normalise a rule-set name or a list of [name, axes] pairs into a LogicalRules tuple.

    Args:
      rules: "auto", a preset name (see RULE_PRESETS) or ordered [logical_name, mesh_axes]
        pairs (mesh_axes: an axis name, a list of them, or None).
      mesh: the device mesh. For "auto" its size-1 axes are dropped from every target (without a
        mesh the full table is returned); presets and lists are returned as they are.

    Raises:
      ConfigError: an unknown rule-set name.
    """
    if isinstance(rules, str):
        if rules in _BY_MESH:
            return _BY_MESH[rules](mesh)
        if rules not in RULE_PRESETS:
            # The choices listed are the explicit presets; "auto" is the default rule set.
            presets = [n for n in RULE_PRESETS if n not in _BY_MESH]
            close = difflib.get_close_matches(rules, list(RULE_PRESETS), n=1)
            raise ConfigError(
                f"sharding.rules={rules!r} is not a preset; choose one of: {', '.join(presets)}"
                + (f" (did you mean '{close[0]}'?)" if close else "")
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
    """The mesh axes of one rule target or PartitionSpec entry, as a tuple."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def is_activation_name(name: str, batch_names: Sequence[str] = ()) -> bool:
    """Whether a logical name belongs to activations or batch fields rather than parameters."""
    return name in ACTIVATION_NAMES or name.startswith(ACTIVATION_PREFIX) or name in batch_names


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
    logical_axes: Sequence[LogicalName], rules: LogicalRules, *, what: str = "array",
    mesh_axis_names: Sequence[str] = (),
) -> PartitionSpec:
    """Map one array's logical axis names to a PartitionSpec of mesh axes.

    Args:
      logical_axes: one logical name (or None = replicated) per dimension.
      rules: ordered (logical_name, mesh_axes) pairs; the first usable rule for a name wins.
      what: how to name the array in errors (e.g. "parameter 'layers/mlp/wi/kernel'").
      mesh_axis_names: the mesh's axis names; a name no rule maps that is one of them (or a
        tuple of them) maps to itself.

    Raises:
      ShardingError: a logical name has no rule and is not a mesh axis name.

    Example: ``logical_to_spec(("embed", "mlp"), (("embed", "fsdp"), ("mlp", "tensor")))`` is
    ``PartitionSpec("fsdp", "tensor")``.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        targets = _candidates(name, rules, mesh_axis_names, what)
        chosen = next((t for t in targets if not used.intersection(axes_of(t))), None)
        used.update(axes_of(chosen))
        spec.append(chosen)
    return PartitionSpec(*spec)


def _candidates(name: LogicalName, rules: LogicalRules, mesh_axis_names: Sequence[str],
                what: str) -> list[MeshAxes]:
    """The targets a name may take, in order: its rules', else the mesh axes it names itself."""
    if isinstance(name, str):
        targets = [target for rule_name, target in rules if rule_name == name]
        if targets:
            return targets
    names = (name,) if isinstance(name, str) else tuple(name)
    if names and all(n in mesh_axis_names for n in names):
        return [names[0] if len(names) == 1 else names]
    known = sorted({rule_name for rule_name, _ in rules} | set(mesh_axis_names))
    close = difflib.get_close_matches(str(name), known, n=1)
    raise ShardingError(
        f"{what} has logical axis {name!r} but no sharding rule maps it; add a rule such "
        f"as [{name!r}, null] to sharding.rules"
        + (f" (did you mean '{close[0]}'?)" if close else "")
    )


def pad_names(logical_axes: Sequence[LogicalName], shape: Sequence[int], *,
              what: str = "array") -> tuple[LogicalName, ...]:
    """`logical_axes` padded with None to the rank of `shape` (Flax replicates the trailing dims).

    Raises:
      ShardingError: more names than dimensions.
    """
    if len(logical_axes) > len(shape):
        raise ShardingError(
            f"{what} of shape {tuple(shape)} is annotated with {len(logical_axes)} logical axes "
            f"{tuple(logical_axes)}"
        )
    return tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))


def _check_divisible(
    shape: Sequence[int], spec: PartitionSpec, logical: Sequence[LogicalName], mesh: Mesh,
    what: str,
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
    mesh: Mesh, logical_axes: Sequence[LogicalName], rules: LogicalRules, shape: Sequence[int],
    *, what: str = "array",
) -> NamedSharding:
    """The NamedSharding of an array of `shape` with these logical axes (checked to divide).

    An annotation shorter than the rank replicates the trailing dimensions; a longer one is an
    error, as is a dimension its mesh axes do not divide.
    """
    logical = pad_names(logical_axes, shape, what=what)
    spec = logical_to_spec(logical, rules, what=what, mesh_axis_names=mesh.axis_names)
    _check_divisible(shape, spec, logical, mesh, what)
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


def current_context() -> tuple[Mesh, LogicalRules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, or None outside one."""
    return _ACTIVATION_CONTEXT.get()


def constrain(x: jax.Array, logical_axes: Sequence[LogicalName]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside `activation_sharding`.

    Example: ``x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))``.
    """
    context = current_context()
    if context is None:
        return x
    mesh, rules = context
    what = f"activation {tuple(logical_axes)}"
    return _constrained(x, named_sharding(mesh, logical_axes, rules, x.shape, what=what))


def constrain_spec(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """Constrain an array to a PartitionSpec of mesh axes, for sharding code that derives specs
    from the rules (see `context_spec`); a no-op outside `activation_sharding`."""
    context = current_context()
    if context is None:
        return x
    return _constrained(x, NamedSharding(context[0], spec))


def context_spec(logical_axes: Sequence[LogicalName]) -> PartitionSpec | None:
    """What the enclosing `activation_sharding`'s rules make of these logical axes (None
    outside one): the spec of a parameter or activation so annotated."""
    context = current_context()
    if context is None:
        return None
    mesh, rules = context
    return logical_to_spec(logical_axes, rules, mesh_axis_names=mesh.axis_names)


def _constrained(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    ambient = jax.sharding.get_abstract_mesh()
    if not ambient.empty and ambient.manual_axes:
        # Inside a shard_map over some axes (a pipeline stage): the constraint is on the other
        # axes of the mesh as the per-device code sees it.
        sharding = NamedSharding(ambient, sharding.spec)
    return jax.lax.with_sharding_constraint(x, sharding)


# --------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array: batch and length axes by the rules."""
    logical = ("batch", "length")[:ndim] + (None,) * max(0, ndim - 2)
    return NamedSharding(mesh, logical_to_spec(logical, rules, what="the batch"))


def batch_shardings(mesh: Mesh, rules: LogicalRules,
                    batch_axes: Mapping[str, Sequence[LogicalName]]) -> dict[str, NamedSharding]:
    """One NamedSharding per batch field, from the logical names of its dimensions.

    Args:
      mesh: the device mesh.
      rules: logical rules (see `resolve_rules`).
      batch_axes: field -> one logical name (or None) per dimension, e.g. ``{"images": ("batch",
        "height", "width", "channels"), "labels": ("batch",)}``.

    Returns:
      field -> NamedSharding; divisibility by the shapes is the caller's check (the batch size is
      a setting with its own message: `jaxscale.run.build.check_batch`).
    """
    return {
        key: NamedSharding(mesh, logical_to_spec(names, rules, what=f"batch field {key!r}",
                                                 mesh_axis_names=mesh.axis_names))
        for key, names in batch_axes.items()
    }
