"""The functional train-step builder.

`make_train_step` returns a pure function ``(state, batch, rng) -> (state, metrics)``; `jit_step`
compiles it with the state's shardings, the batch sharding and the state donated. Everything the
step does is in that one function: gradient accumulation, the non-finite guard and the metrics are
parts of it, not alternative paths through it.

A batch is a dict of [B, T] arrays:
  inputs       int32 token ids fed to the model
  targets      int32 next-token ids; negative ids are ignored by the loss
  loss_mask    optional, 1 where a target counts and 0 where it does not
  positions    optional, position of each token within its document (packing)
  segment_ids  optional, document id of each token; attention stays within a document
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
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


def token_weights(batch: Batch) -> jax.Array:
    """1.0 where a target counts: a non-negative target and a non-zero loss_mask (if any)."""
    weight_BT = (batch["targets"] >= 0).astype(jnp.float32)
    if "loss_mask" in batch:
        weight_BT = weight_BT * batch["loss_mask"].astype(jnp.float32)
    return weight_BT


def lm_loss(logits_BTV: jax.Array, batch: Batch, *, z_loss: float = 0.0) -> LossOutput:
    """Next-token cross-entropy (float32) with masking and optional z-loss.

    The z-loss, ``z_loss * logsumexp(logits)**2``, keeps the softmax normaliser near 1.
    The reported "loss" is the cross-entropy alone.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    weight_BT = token_weights(batch)
    targets_BT = jnp.maximum(batch["targets"], 0)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # A one-hot contraction keeps the vocab dimension shardable (no gather across devices).
    target_logit_BT = jnp.einsum(
        "btv,btv->bt", logits_BTV, jax.nn.one_hot(targets_BT, logits_BTV.shape[-1])
    )
    ce_sum = jnp.sum((lse_BT - target_logit_BT) * weight_BT)
    z_sum = jnp.sum(jnp.square(lse_BT) * weight_BT)
    return LossOutput(
        objective=ce_sum + z_loss * z_sum,
        weight=jnp.sum(weight_BT),
        sums={"loss": ce_sum, "z_loss": z_sum},
    )


LossFn = Callable[[jax.Array, Batch], LossOutput]
ForwardFn = Callable[..., Any]


def model_forward(model: nn.Module) -> ForwardFn:
    """Calls a model that follows the jaxscale model interface on a batch.

    Returns a function ``(variables, batch, rng, deterministic, mutable) -> (logits, updates)``.
    """

    def forward(variables, batch, rng, deterministic, mutable):
        out = model.apply(
            variables,
            batch["inputs"],
            batch.get("positions"),
            batch.get("segment_ids"),
            deterministic=deterministic,
            rngs={} if rng is None else {"dropout": rng},
            mutable=mutable,
        )
        return out if mutable else (out, {})

    return forward


def _microbatches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B // num, ...], microbatch i holding rows i, i+num, i+2*num, ...

    Taking strided rows keeps every device's share of each microbatch on that device: a device
    that holds a contiguous block of the batch holds a contiguous block of every microbatch.
    """

    def split(x):
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _constrain_batch(batch: Batch) -> Batch:
    return jax.tree_util.tree_map(lambda x: shd.constrain(x, ("batch", "length")[: x.ndim]), batch)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn | None = None,
    z_loss: float = 0.0,
    grad_accum: int = 1,
    learning_rate_fn: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    rules: shd.LogicalRules = (),
    forward_fn: ForwardFn | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Build the pure training step.

    Args:
      model: a Flax module following the jaxscale model interface (see `jaxscale.models`).
      tx: the optax transformation (`optim.make_optimizer`).
      loss_fn: ``(logits, batch) -> LossOutput`` of sums; default next-token cross-entropy.
      z_loss: weight of the z-loss in the default loss.
      grad_accum: microbatches per step; gradients are summed in float32 over a `lax.scan`.
      learning_rate_fn: the schedule, to report the learning rate in the metrics.
      mesh, rules: when given, activations are constrained by the rules while tracing.
      forward_fn: replaces `model_forward(model)` for models with another call signature.

    Returns:
      ``train_step(state, batch, rng) -> (state, metrics)``. The step's RNG is
      ``fold_in(rng, state.step)``, so passing the same base key every step is correct. If the
      loss or the gradient norm is not finite the update is dropped (parameters and optimizer
      state unchanged), `skipped_steps` grows, and ``metrics["finite"]`` is False.
    """
    loss_fn = loss_fn or functools.partial(lm_loss, z_loss=z_loss)
    forward = forward_fn or model_forward(model)

    def sum_loss(params, extra, batch, rng):
        mutable = tuple(extra) if extra else False
        logits, updates = forward({"params": params, **extra}, batch, rng, False, mutable)
        out = loss_fn(logits, batch)
        return out.objective, (out, dict(updates))

    grad_fn = jax.grad(sum_loss, has_aux=True)

    def accumulate(state: TrainState, batch: Batch, rng: jax.Array):
        """Summed float32 gradients, loss sums and updated collections over the microbatches."""
        if grad_accum == 1:
            grads, (out, extra) = grad_fn(state.params, state.extra, _constrain_batch(batch), rng)
            grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
            return grads, out, extra or state.extra

        def body(carry, xs):
            grads_acc, out_acc, extra = carry
            micro, index = xs
            grads, (out, updates) = grad_fn(
                state.params, extra, _constrain_batch(micro), jax.random.fold_in(rng, index)
            )
            grads_acc = jax.tree_util.tree_map(
                lambda a, g: a + g.astype(jnp.float32), grads_acc, grads
            )
            out_acc = jax.tree_util.tree_map(jnp.add, out_acc, out)
            return (grads_acc, out_acc, updates or extra), None

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), state.params)
        micro = _microbatches(batch, grad_accum)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        out_zeros = jax.tree_util.tree_map(
            jnp.zeros_like,
            jax.eval_shape(lambda: sum_loss(state.params, state.extra, first, rng)[1][0]),
        )
        (grads, out, extra), _ = jax.lax.scan(
            body, (zeros, out_zeros, state.extra), (micro, jnp.arange(grad_accum))
        )
        return grads, out, extra

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        with shd.activation_sharding(mesh, rules):
            rng = jax.random.fold_in(rng, state.step)
            grads, out, extra = accumulate(state, batch, rng)
            weight = jnp.maximum(out.weight, 1.0)
            grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
            grad_norm = _tree_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            finite = jnp.isfinite(out.objective) & jnp.isfinite(grad_norm)
            keep = functools.partial(
                jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old)
            )
            new_state = state.replace(
                step=state.step + 1,
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                extra=keep(extra, state.extra),
                skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            )
            metrics = {"loss": out.objective / weight}
            metrics.update({k: v / weight for k, v in out.sums.items()})
            metrics.update(
                grad_norm=grad_norm,
                tokens=out.weight,
                finite=finite,
                skipped_steps=new_state.skipped_steps,
            )
            if learning_rate_fn is not None:
                metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module,
    *,
    loss_fn: LossFn | None = None,
    mesh: Mesh | None = None,
    rules: shd.LogicalRules = (),
    forward_fn: ForwardFn | None = None,
) -> Callable[[TrainState, Batch, Metrics], Metrics]:
    """Build the pure evaluation step ``(state, batch, sums) -> sums``.

    It adds this batch's sums to the running `sums` (start from `eval_sums_zero(...)`):
    ``{"weight": tokens, "objective": ..., "loss": cross-entropy sum, ...}``; divide by "weight"
    at the end (`finish_eval`). Chaining the batches through `sums` makes each evaluation call
    depend on the previous one, so no two of them run at once (on simulated CPU devices two
    independent programs with collectives can deadlock each other).
    """
    loss_fn = loss_fn or lm_loss
    forward = forward_fn or model_forward(model)

    def eval_step(state: TrainState, batch: Batch, sums: Metrics) -> Metrics:
        with shd.activation_sharding(mesh, rules):
            variables = {"params": state.params, **state.extra}
            logits, _ = forward(variables, _constrain_batch(batch), None, True, False)
            out = loss_fn(logits, batch)
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
