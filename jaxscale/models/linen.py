"""The Linen adapter: a `flax.linen.Module` as a jaxscale model.

Parameters keep the logical names the module gives them (`nn.with_logical_partitioning`, or
`nn.with_partitioning` with mesh axis names); unannotated ones are named later by the
`sharding.param_rules` path patterns. Collections other than "params" (BatchNorm's
"batch_stats", ...) are carried in the train state and updated by every training call. Two
collections are read and dropped after each call: values a module `sow`s into "aux_loss" are added
to the objective, and those it sows into "metrics" are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.core.trees import path_str
from jaxscale.models.adapter import Applied, Stages, call_keywords

AUX_LOSS = "aux_loss"  # collection a module sows auxiliary losses into
METRICS = "metrics"  # collection a module sows values to report into


def sown_scalars(tree: Any) -> dict[str, jax.Array]:
    """'module/name' -> the sum of what was sown there (float32), for a sown collection."""
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [k for k in path_str(path).split("/") if not k.isdigit()]
        name = "/".join(keys)
        out[name] = out.get(name, 0.0) + jnp.sum(jnp.asarray(leaf, jnp.float32))
    return out


class LinenAdapter:
    """Wraps a Linen module (see the module docstring).

    Args:
      module: the Flax Linen module.
      config: the model's config dataclass, if any (FLOPs formulas read it).
      call_args: role -> argument name of the module's ``__call__`` (None: do not pass), where
        the default matching (`jaxscale.models.adapter.ROLE_NAMES`) does not fit.
      rng_streams: the RNG streams a training call draws from (e.g. "dropout").
    """

    kind = "linen"

    def __init__(self, module: nn.Module, *, config: Any = None,
                 call_args: Mapping[str, str | None] | None = None,
                 rng_streams: tuple[str, ...] = ("dropout",)):
        self.module = module
        self.config = config if config is not None else getattr(module, "cfg", None)
        self.call_args = call_args
        self.rng_streams = rng_streams

    def _kwargs(self, inputs: Mapping[str, Any], train: bool) -> dict[str, Any]:
        return call_keywords(self.module.__call__, inputs, train, call_args=self.call_args,
                             what=f"model {type(self.module).__name__}")

    def _rngs(self, rng: Any) -> dict[str, Any]:
        if rng is None:
            return {}
        return {s: jax.random.fold_in(rng, i) if i else rng
                for i, s in enumerate(self.rng_streams)}

    def stages(self) -> Stages | None:
        """The module split for pipeline parallelism (its ``pipeline_stages()``), or None.

        The layer runs are called with Flax's logical axis rules unset: inside the pipeline's
        per-stage code an ambient mesh exists, under which Flax's own constraints (and its
        shape check of a boxed initialiser at apply time) would apply to arrays of another rank;
        jaxscale's `constrain` still applies the rules there.
        """
        split = getattr(self.module, "pipeline_stages", None)
        if split is None:
            return None
        stages = split()

        def layers(*args):
            with nn.logical_axis_rules(()):
                return stages.layers(*args)

        return stages._replace(layers=layers)

    def init(self, rng: Any, inputs: Mapping[str, Any]) -> tuple[Any, dict]:
        variables = dict(self.module.init(
            {"params": rng, **self._rngs(rng)}, **self._kwargs(inputs, train=False)))
        params = variables.pop("params", {})
        for name in (AUX_LOSS, METRICS, "intermediates"):
            variables.pop(name, None)
        return params, variables

    def apply(self, params: Any, extra: dict, inputs: Mapping[str, Any], *, rng: Any,
              train: bool) -> Applied:
        mutable = [*(extra if train else ()), AUX_LOSS, METRICS]
        outputs, updates = self.module.apply(
            {"params": params, **extra}, **self._kwargs(inputs, train),
            rngs=self._rngs(rng), mutable=mutable,
        )
        updates = dict(updates)
        aux_losses = sown_scalars(updates.pop(AUX_LOSS, {}))
        aux_metrics = sown_scalars(updates.pop(METRICS, {}))
        new_extra = {k: updates.get(k, v) for k, v in extra.items()}
        return Applied(outputs, new_extra, aux_losses, aux_metrics)
