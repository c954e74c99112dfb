"""The functional train-step builder.

`make_train_step` returns a pure function ``(state, batch, rng) -> (state, metrics)``, composed of
three parts: `gradient` (float32 gradients of an objective's sum), `microbatched` (today's
`lax.scan` accumulation over strided microbatches) and `guarded_update` (the optimizer update,
dropped when the loss or the gradient is not finite). Features wrap these parts; no flag opens a
second path through them. `jit_step` compiles the step with the state's shardings, the batch's
and the state donated.

The step knows nothing of what a batch holds: the objective (a task's loss over a model's
outputs, `jaxscale.tasks.objective`) reads the batch, and `batch_axes` names its dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxscale.core import sharding as shd
from jaxscale.core.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


# optax >= 0.2.5 has optax.tree.norm; older versions only optax.global_norm.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class LossOutput(NamedTuple):
    objective: jax.Array  # sum over tokens of the loss to minimise
    weight: jax.Array  # number of tokens (or total weight) the sums run over
    sums: dict[str, jax.Array]  # further per-token sums to report, divided by `weight`


Objective = Callable[..., tuple[LossOutput, Any]]
"""``objective(params, extra, batch, rng, train) -> (LossOutput, new_extra)``: the model called on
a batch and its loss as sums (a task's loss over a model adapter's outputs; see
`jaxscale.tasks.objective`). `extra` holds the model's other collections (e.g. batch statistics);
`rng` is None for evaluation."""

GradFn = Callable[..., tuple[Any, LossOutput, Any]]
"""``grad_fn(params, extra, batch, rng) -> (float32 gradient sums, LossOutput, new_extra)``."""


def split_microbatches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B // num, ...], microbatch i holding rows i, i+num, i+2*num, ...

    Taking strided rows keeps every device's share of each microbatch on that device: a device
    that holds a contiguous block of the batch holds a contiguous block of every microbatch.
    """

    def split(x):
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def constrain_batch(batch: Batch, batch_axes: Mapping[str, Sequence[str | None]] | None) -> Batch:
    """Constrain every batch field by its logical names (a field not named: by its batch dim)."""
    axes = batch_axes or {}
    return {k: shd.constrain(x, tuple(axes.get(k, ("batch",) + (None,) * (x.ndim - 1))))
            for k, x in batch.items()}


def gradient(objective: Objective, batch_axes=None) -> GradFn:
    """The gradient of the objective's sum, in float32, with its loss sums and new collections."""

    def sum_loss(params, extra, batch, rng):
        out, new_extra = objective(params, extra, constrain_batch(batch, batch_axes), rng, True)
        return out.objective, (out, new_extra)

    grad_fn = jax.grad(sum_loss, has_aux=True)

    def fn(params, extra, batch, rng):
        grads, (out, new_extra) = grad_fn(params, extra, batch, rng)
        return jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads), out, new_extra

    return fn


def microbatched(grad_fn: GradFn, num: int) -> GradFn:
    """Sum `grad_fn` over `num` strided microbatches of the batch with a `lax.scan`.

    Gradients and loss sums accumulate in float32; the collections (e.g. batch statistics) flow
    from one microbatch to the next; microbatch i draws from ``fold_in(rng, i)``.
    """
    if num == 1:
        return grad_fn

    def fn(params, extra, batch, rng):
        def body(carry, xs):
            grads_acc, out_acc, extra = carry
            micro, index = xs
            grads, out, new_extra = grad_fn(params, extra, micro, jax.random.fold_in(rng, index))
            grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
            out_acc = jax.tree_util.tree_map(jnp.add, out_acc, out)
            return (grads_acc, out_acc, new_extra), None

        micro = split_microbatches(batch, num)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        _, out_shape, _ = jax.eval_shape(grad_fn, params, extra, first, rng)
        zeros = (jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params),
                 jax.tree_util.tree_map(jnp.zeros_like, out_shape), extra)
        (grads, out, extra), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num)))
        return grads, out, extra

    return fn


def guarded_update(tx: optax.GradientTransformation):
    """``update(state, grads, objective, extra) -> (state, grad_norm, finite)``.

    Applies the mean gradients unless the objective or the gradient norm is not finite; then the
    parameters, optimizer state and collections stay as they were and `skipped_steps` grows.
    """

    def update(state: TrainState, grads: Any, objective: jax.Array, extra: Any):
        grad_norm = _tree_norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)

        # A conditional, not a select of new and old values: the update is computed into the
        # donated state's buffers, so the guard costs no second copy of the parameters and
        # optimizer state (a select keeps both alive); the skip branch returns them as they were.
        def apply(operands):
            params, opt_state, _, new_extra, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, new_extra

        def skip(operands):
            params, opt_state, old_extra, _, _ = operands
            return params, opt_state, old_extra

        params, opt_state, extra = jax.lax.cond(
            finite, apply, skip, (state.params, state.opt_state, state.extra, extra, grads))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extra=extra,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        )
        return new_state, grad_norm, finite

    return update


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    learning_rate_fn: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    rules: shd.LogicalRules = (),
    batch_axes: Mapping[str, Sequence[str | None]] | None = None,
    weight_name: str = "tokens",
    grad_fn: GradFn | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Build the pure training step: `gradient` -> `microbatched` -> `guarded_update`.

    Args:
      objective: ``(params, extra, batch, rng, train) -> (LossOutput, new_extra)``.
      tx: the optax transformation (`optim.make_optimizer`).
      grad_accum: microbatches per step; gradients are summed in float32 over a `lax.scan`.
      learning_rate_fn: the schedule, to report the learning rate in the metrics.
      mesh, rules: when given, activations are constrained by the rules while tracing.
      batch_axes: logical names of every batch field (the task's batch spec).
      weight_name: the metric that reports the loss weight (counted tokens or examples).
      grad_fn: the gradient function, in place of ``microbatched(gradient(objective),
        grad_accum)`` (a pipeline's: `jaxscale.core.pipeline_step`).

    Returns:
      ``train_step(state, batch, rng) -> (state, metrics)``. The step's RNG is
      ``fold_in(rng, state.step)``, so passing the same base key every step is correct. If the
      loss or the gradient norm is not finite the update is dropped (parameters and optimizer
      state unchanged), `skipped_steps` grows, and ``metrics["finite"]`` is False.
    """
    if grad_fn is None:
        grad_fn = microbatched(gradient(objective, batch_axes), grad_accum)
    update = guarded_update(tx)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        with shd.activation_sharding(mesh, rules):
            rng = jax.random.fold_in(rng, state.step)
            grads, out, extra = grad_fn(state.params, state.extra, batch, rng)
            weight = jnp.maximum(out.weight, 1.0)
            grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
            new_state, grad_norm, finite = update(state, grads, out.objective, extra)
            metrics = {"loss": out.objective / weight}
            metrics.update({k: v / weight for k, v in out.sums.items()})
            metrics.update(
                grad_norm=grad_norm,
                finite=finite,
                skipped_steps=new_state.skipped_steps,
            )
            metrics[weight_name] = out.weight
            if learning_rate_fn is not None:
                metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(
    objective: Objective,
    *,
    mesh: Mesh | None = None,
    rules: shd.LogicalRules = (),
    batch_axes: Mapping[str, Sequence[str | None]] | None = None,
) -> Callable[[TrainState, Batch, Metrics], Metrics]:
    """Build the pure evaluation step ``(state, batch, sums) -> sums``.

    It adds this batch's sums to the running `sums` (start from `eval_sums_zero(...)`):
    ``{"weight": tokens, "objective": ..., "loss": cross-entropy sum, ...}``; divide by "weight"
    at the end (`finish_eval`). Chaining the batches through `sums` makes each evaluation call
    depend on the previous one, so no two of them run at once (on simulated CPU devices two
    independent programs with collectives can deadlock each other).
    """

    def eval_step(state: TrainState, batch: Batch, sums: Metrics) -> Metrics:
        with shd.activation_sharding(mesh, rules):
            out, _ = objective(state.params, state.extra, constrain_batch(batch, batch_axes),
                               None, False)
        new = {"objective": out.objective, "weight": out.weight, **out.sums}
        return {k: sums.get(k, 0.0) + v for k, v in new.items()}

    return eval_step


def eval_sums_zero(eval_step: Callable, state: Any, batch: Batch) -> Metrics:
    """Zeros of the running sums that `eval_step` (the pure function) returns."""
    shapes = jax.eval_shape(eval_step, state, batch, {})
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def finish_eval(sums: Metrics) -> dict[str, float]:
    """Per-token means from summed eval outputs (a host read: call once per evaluation)."""
    sums = jax.device_get(sums)
    weight = max(float(sums["weight"]), 1.0)
    return {k: float(v) / weight for k, v in sums.items() if k not in ("weight", "objective")}


def jit_step(
    step_fn: Callable,
    state_shardings: Any,
    batch_sharding: NamedSharding,
    *,
    donate: bool = True,
) -> Callable:
    """jit a train step with the state's shardings in and out, the state donated.

    Metrics come out replicated; the RNG key is left to jit.
    """
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,) if donate else (),
    )


def jit_eval_step(step_fn: Callable, state_shardings: Any, batch_sharding: NamedSharding):
    """jit an eval step with the state's and the batch's shardings."""
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, None))
