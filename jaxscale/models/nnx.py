"""The NNX adapter: a `flax.nnx` model as a jaxscale model.

What counts as an NNX model (`is_nnx`), most explicit first:

* an `nnx.Module` instance: its current variables are the initial ones (the init key is not
  used, and under `jax.jit` they enter as constants: prefer a factory for large models);
* an `nnx.Module` subclass, or any callable marked with `nnx_factory`;
* any other callable with a parameter named ``rngs`` (``lambda rngs: MyLM(cfg, rngs=rngs)``).

A factory is called as ``factory(rngs=rngs)`` when it has a parameter named ``rngs``, else as
``factory(rngs)`` (``factory()`` if it takes none). Its ``nnx.Rngs`` has the streams "params" (the
init key itself), "dropout" and "default" (keys folded from it), so under `jax.jit` or
`jax.eval_shape` the parameters are born from the traced key, each with its sharding.

The state is plain data. ``init`` returns the `nnx.Param` variables as a nested dict (string keys:
attribute names and list indices), each array boxed in `nn.Partitioned` with the names its
sharding metadata gives (`nnx.with_partitioning(init, names)`; unannotated arrays stay bare for
the path rules), and every other variable but the RNG state (`nnx.BatchStat`, ...) as ``extra``,
a nested dict of arrays that training calls update. RNG state (`nnx.RngKey`, `nnx.RngCount`) is
never stored: each call rebuilds it from the step's key (a key per variable path), so dropout
draws from that key in training. The train switch reaches the model by its ``__call__``
arguments (`call_keywords`); a model without one has its modules' ``deterministic`` and
``use_running_average`` attributes set instead (`nnx.Module.set_attributes`). A ``__call__``
with an ``rngs`` parameter receives an ``nnx.Rngs`` of the step's key.

A module reports values by sowing them: ``self.sow(AuxLoss, "name", x)`` adds ``x`` to the
objective, ``self.sow(Metric, "name", x)`` reports it; each is summed per 'module/name' (list
indices dropped, like Linen's sown collections) and never enters ``extra``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.core.trees import path_str
from jaxscale.models.adapter import TRAIN_FLAGS, Applied, call_keywords
from jaxscale.models.linen import sown_scalars

__all__ = ["AuxLoss", "Metric", "NnxAdapter", "is_nnx", "nnx_factory"]


class AuxLoss(nnx.Variable):
    """A value a module sows to be added to the objective: ``self.sow(AuxLoss, "name", x)``."""


class Metric(nnx.Variable):
    """A value a module sows to be reported with the metrics: ``self.sow(Metric, "name", x)``."""


_MARK = "__jaxscale_nnx__"
# Sharding metadata keys of `nnx.with_partitioning`, newest first (flax 0.12 names it
# out_sharding; 0.11 sharding_names; earlier sharding).
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")
_SHAPE_SUFFIX = re.compile(r"_[A-Z]+$")


def nnx_factory(fn: Callable) -> Callable:
    """Mark `fn` (``rngs -> nnx.Module``) as an NNX model factory for `is_nnx` / `adapt`.

    Example: ``adapt(nnx_factory(lambda r: MyLM(cfg, r)))``. Returns `fn` itself.
    """
    setattr(fn, _MARK, True)
    return fn


def _parameters(fn: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def is_nnx(obj: Any) -> bool:
    """Whether `obj` is an NNX model `NnxAdapter` takes (see the module docstring)."""
    if isinstance(obj, nnx.Module):
        return True
    if isinstance(obj, type):
        return issubclass(obj, nnx.Module)
    if getattr(obj, _MARK, False):
        return True
    return callable(obj) and not isinstance(obj, nn.Module) and "rngs" in _parameters(obj)


def _no_eager_sharding():
    # flax >= 0.12 shards a variable with sharding metadata as it is created, which needs a mesh
    # whose axes the (logical) names are; jaxscale shards the state itself, from the names.
    use = getattr(nnx, "use_eager_sharding", None)
    return use(False) if use is not None else contextlib.nullcontext()


def _build(factory: Callable, rngs: nnx.Rngs) -> nnx.Module:
    parameters = _parameters(factory)
    if "rngs" in parameters:
        return factory(rngs=rngs)
    return factory(rngs) if parameters else factory()


def _init_rngs(rng: jax.Array) -> nnx.Rngs:
    return nnx.Rngs(params=rng, dropout=jax.random.fold_in(rng, 1),
                    default=jax.random.fold_in(rng, 2))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _flat(state: Any) -> list[tuple[tuple, nnx.Variable]]:
    """(path of keys, variable) for every variable of an `nnx.State` (or a dict of variables)."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
    return [(tuple(_key(e) for e in path), var) for path, var in leaves]


def _nest(items: list[tuple[tuple, Any]]) -> dict:
    """{"a": {"0": {"b": x}}} from [(("a", 0, "b"), x)]: string keys (what orbax writes)."""
    out: dict = {}
    for path, value in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = value
    return out


def _lookup(tree: Mapping, path: tuple) -> Any:
    for k in path:
        tree = tree[str(k)]
    return tree


def _value(var: nnx.Variable) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def _names(var: nnx.Variable) -> tuple | None:
    """The variable's logical names from its sharding metadata, one per dimension; None if none."""
    metadata = var.get_metadata() if hasattr(var, "get_metadata") else {}
    spec = next((metadata[k] for k in _SHARDING_KEYS if metadata.get(k)), None)
    if spec is None:
        return None
    spec = getattr(spec, "spec", spec)  # a NamedSharding: its PartitionSpec
    names = tuple(spec)
    ndim = len(getattr(_value(var), "shape", ()))
    return names + (None,) * (ndim - len(names))


def _boxed(var: nnx.Variable) -> Any:
    names = _names(var)
    value = _value(var)
    return value if names is None else nn.Partitioned(value, names)


@dataclasses.dataclass(frozen=True)
class _Group:
    """One kind of the module's variables: their paths and abstract variables (shapes, metadata),
    and the treedef that rebuilds an `nnx.State` of them."""

    items: tuple[tuple[tuple, nnx.Variable], ...]
    treedef: Any

    @classmethod
    def of(cls, state: Any) -> _Group:
        return cls(tuple(_flat(state)),
                   jax.tree_util.tree_structure(state, is_leaf=_is_variable))

    def state(self, values: list[Any]) -> Any:
        variables = [var.replace(value) for (_, var), value in zip(self.items, values, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, variables)

    def from_dict(self, tree: Mapping) -> Any:
        return self.state([_lookup(tree, path) for path, _ in self.items])


def _fresh_rng_state(group: _Group, rng: jax.Array | None) -> Any:
    """The RNG variables recreated from `rng`: every key folded with a hash of its path (so each
    stream of each module differs, the same on every host), every counter zero."""
    base = jax.random.key(0) if rng is None else rng
    if not jax.dtypes.issubdtype(base.dtype, jax.dtypes.prng_key):
        base = jax.random.wrap_key_data(base)
    values = []
    for path, var in group.items:
        abstract = _value(var)
        if isinstance(var, nnx.RngKey):
            key = jax.random.fold_in(base, zlib.crc32("/".join(map(str, path)).encode()))
            if abstract.shape:  # one key per layer of a stacked (vmapped) module
                key = jax.random.split(key, abstract.shape)
            if not jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            values.append(key)
        else:
            values.append(jnp.zeros(abstract.shape, abstract.dtype))
    return group.state(values)


@dataclasses.dataclass(frozen=True)
class _Template:
    graphdef: Any
    params: _Group
    rngs: _Group
    extra: _Group


def _split(module: nnx.Module):
    return nnx.split(module, nnx.Param, nnx.RngState, ...)


def _sown(captured: Any) -> dict[str, jax.Array]:
    flat = {path_str(path): _value(var) for path, var in _flat(captured)}
    return sown_scalars(flat)


def _merge_sums(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


class NnxAdapter:
    """Wraps an NNX module or module factory (see the module docstring).

    Args:
      model_or_factory: an `nnx.Module`, an `nnx.Module` subclass, or a function
        ``rngs -> nnx.Module`` (see `is_nnx`).
      config: the model's config dataclass, if any (FLOPs formulas read it); default: the
        model's (or the factory's) ``cfg`` attribute.
      call_args: role -> argument name of the module's ``__call__`` (None: do not pass), where
        the default matching (`jaxscale.models.adapter.ROLE_NAMES`) does not fit.

    Example::

        adapter = NnxAdapter(lambda rngs: MyLM(rngs=rngs))
        params, extra = adapter.init(jax.random.key(0), {"inputs": tokens_BT})
        out = adapter.apply(nn.unbox(params), extra, {"inputs": tokens_BT}, rng=key, train=True)
    """

    kind = "nnx"
    # Appended to the builder's error for a parameter that no name reaches.
    hint = "; or give the NNX variables names with nnx.with_partitioning(init, names)"

    def __init__(self, model_or_factory: Any, *, config: Any = None,
                 call_args: Mapping[str, str | None] | None = None):
        if not is_nnx(model_or_factory):
            raise TypeError(
                f"{type(model_or_factory).__name__} is not an NNX model: pass an nnx.Module, an "
                "nnx.Module subclass or a function rngs -> nnx.Module"
            )
        self.model = model_or_factory
        self.config = config if config is not None else getattr(model_or_factory, "cfg", None)
        self.call_args = call_args

    def _module(self, rng: jax.Array) -> nnx.Module:
        if isinstance(self.model, nnx.Module):
            return self.model
        with _no_eager_sharding():
            return _build(self.model, _init_rngs(rng))

    @functools.cached_property
    def _template(self) -> _Template:
        # Structure, shapes and metadata only: an abstract build allocates nothing.
        if isinstance(self.model, nnx.Module):
            module = self.model
        else:
            module = nnx.eval_shape(lambda: self._module(jax.random.key(0)))
        graphdef, params, rngs, extra = _split(module)
        return _Template(graphdef, _Group.of(params), _Group.of(rngs), _Group.of(extra))

    def init(self, rng: Any, inputs: Mapping[str, Any]) -> tuple[Any, dict]:
        """``(params, extra)``: parameters boxed with their names where they have them, and the
        non-parameter, non-RNG variables. `inputs` is unused: an NNX module knows its shapes."""
        del inputs
        _, params, _, extra = _split(self._module(rng))
        return (_nest([(p, _boxed(v)) for p, v in _flat(params)]),
                _nest([(p, _value(v)) for p, v in _flat(extra)]))

    def apply(self, params: Any, extra: dict, inputs: Mapping[str, Any], *, rng: Any,
              train: bool) -> Applied:
        t = self._template
        with _no_eager_sharding():
            module = nnx.merge(t.graphdef, t.params.from_dict(params),
                               _fresh_rng_state(t.rngs, rng), t.extra.from_dict(extra))
        kwargs = call_keywords(module.__call__, inputs, train, call_args=self.call_args,
                               what=f"model {type(module).__name__}")
        if not any(_SHAPE_SUFFIX.sub("", k) in TRAIN_FLAGS for k in kwargs):
            # No train switch in the signature: set Dropout's and BatchNorm's own attributes.
            module.set_attributes(deterministic=not train, use_running_average=not train,
                                  raise_if_not_found=False)
        if "rngs" in _parameters(module.__call__) and "rngs" not in kwargs:
            call_key = jax.random.key(0) if rng is None else rng
            kwargs["rngs"] = nnx.Rngs(dropout=call_key, default=jax.random.fold_in(call_key, 1))

        capture = getattr(nnx, "capture", None)  # flax >= 0.12: sow records only inside it
        if capture is not None:
            outputs, aux_state, metric_state = capture(module, AuxLoss, Metric)(**kwargs)
            aux_losses, aux_metrics = _sown(aux_state), _sown(metric_state)
        else:
            outputs, aux_losses, aux_metrics = module(**kwargs), {}, {}
        # Variables a module assigned as attributes (and sow before nnx.capture existed).
        aux_losses = _merge_sums(aux_losses, _sown(nnx.state(module, AuxLoss)))
        aux_metrics = _merge_sums(aux_metrics, _sown(nnx.state(module, Metric)))

        if train:
            now = dict(_flat(nnx.state(module)))
            new_extra = _nest([(p, _value(now[p]) if p in now else _lookup(extra, p))
                               for p, _ in t.extra.items])
        else:
            new_extra = extra
        return Applied(outputs, new_extra, aux_losses, aux_metrics)
