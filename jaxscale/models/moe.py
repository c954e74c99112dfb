"""Mixture-of-experts MLP for the decoder: a router, top-k token choice and two dispatch paths.

A MoE layer replaces the dense MLP by `model.moe.num_experts` expert MLPs; the router scores
every token against every expert (softmax or sigmoid of a float32 projection), each token goes to
its `top_k` experts and comes back as the score-weighted sum of their outputs (scores
renormalised to sum to 1 if `renormalize`). Optional shared experts see every token.

Dispatch (`model.moe.dispatch`):
  dropless  tokens sorted by expert and run with grouped matmuls; none is dropped
            (`jaxscale.core.experts.dropless`, expert-parallel by all-to-all over the mesh).
  capacity  the classic token-choice dispatch: each expert has C = ceil(k * T * capacity_factor
            / E) slots per sequence, filled first by first choices, then second choices, each in
            token order; an assignment past capacity is dropped (that expert adds nothing and the
            token keeps its residual). One-hot dispatch/combine einsums; the partitioner
            exchanges the [E, B, C, D] buffers between the batch and expert splits.

Auxiliary losses (added to the objective through the "aux_loss" collection, summed over layers
as means per token) and metrics (the "metrics" collection, averaged over MoE layers):
  load balance  E * sum_e f_e * P_e (Switch/GShard): f_e the fraction of the N*k assignments that
                chose expert e, P_e the mean router probability of e; 1.0 when balanced.
  router z      mean over tokens of logsumexp(router logits)^2.
  dropped       fraction of assignments dropped (always 0 for dropless).
  load          f_e per expert (sums to 1).

Logical names: expert weights ("expert", "embed", "mlp") and ("expert", "mlp", "embed"), the
router (None, None) (replicated, it is small), dispatched tokens ("act_expert",
"act_expert_batch", None, "act_embed").
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxscale.config import ModelConfig
from jaxscale.core import experts, remat
from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain

# Metrics reported per expert up to this many experts (their max and min always).
PER_EXPERT_METRICS = 16


def route(logits_NE: jax.Array, *, top_k: int, score: str = "softmax",
          renormalize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing of router logits [..., E].

    Returns:
      (weights [..., k] float32, experts [..., k] int32, probs [..., E] float32): the combine
      weights, the chosen experts (best first), and the routing distribution the load-balancing
      loss reads (the softmax, or the sigmoid scores normalised to sum to 1).
    """
    logits_NE = logits_NE.astype(jnp.float32)
    if score == "softmax":
        scores_NE = jax.nn.softmax(logits_NE, axis=-1)
        probs_NE = scores_NE
    else:
        scores_NE = jax.nn.sigmoid(logits_NE)
        probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    weights_NK, experts_NK = jax.lax.top_k(scores_NE, top_k)
    if renormalize:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    return weights_NK, experts_NK.astype(jnp.int32), probs_NE


def expert_load(experts_NK: jax.Array, num_experts: int) -> jax.Array:
    """f_e: the fraction of all token-expert assignments that went to each expert, [E]."""
    counts_E = jnp.sum(jax.nn.one_hot(experts_NK, num_experts, dtype=jnp.float32),
                       axis=tuple(range(experts_NK.ndim)))
    return counts_E / experts_NK.size


def load_balancing_loss(probs_NE: jax.Array, experts_NK: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e (Switch Transformer, generalised to top-k); 1.0 at perfect balance."""
    E = probs_NE.shape[-1]
    mean_prob_E = jnp.mean(probs_NE.reshape(-1, E), axis=0)
    return E * jnp.sum(expert_load(experts_NK, E) * mean_prob_E)


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """mean(logsumexp(logits)^2) over tokens (ST-MoE): keeps the router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))


def capacity(seq_len: int, top_k: int, num_experts: int, factor: float) -> int:
    """Slots per expert per sequence: ceil(k * T * factor / E), at most T (a token can reach an
    expert once)."""
    return max(1, min(seq_len, math.ceil(top_k * seq_len * factor / num_experts)))


def capacity_routing(experts_BTK: jax.Array, weights_BTK: jax.Array, num_experts: int,
                     slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token-choice dispatch with `slots` per expert per sequence (see the module docstring).

    Returns:
      (dispatch [B, T, E, C] 0/1, combine [B, T, E, C] float32 weights, dropped [B, T, K] bool).
    """
    B, T, K = experts_BTK.shape
    onehot_BKTE = jax.nn.one_hot(jnp.swapaxes(experts_BTK, 1, 2), num_experts, dtype=jnp.int32)
    # Slot of each assignment in its expert: first choices of every token, then second choices.
    filled_BAE = jnp.cumsum(onehot_BKTE.reshape(B, K * T, num_experts), axis=1)
    slot_BKT = jnp.sum((filled_BAE.reshape(B, K, T, num_experts) - 1) * onehot_BKTE, axis=-1)
    slot_BTK = jnp.swapaxes(slot_BKT, 1, 2)
    dropped_BTK = slot_BTK >= slots
    onehot_BTKE = jnp.swapaxes(onehot_BKTE, 1, 2).astype(jnp.float32)
    slot_BTKC = jax.nn.one_hot(slot_BTK, slots, dtype=jnp.float32)  # all 0 past capacity
    dispatch_BTEC = jnp.einsum("btke,btkc->btec", onehot_BTKE, slot_BTKC)
    combine_BTEC = jnp.einsum("btke,btkc,btk->btec", onehot_BTKE, slot_BTKC,
                              weights_BTK.astype(jnp.float32))
    return dispatch_BTEC, combine_BTEC, dropped_BTK


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class MoeMlp(nn.Module):
    """The mixture-of-experts MLP. Returns (output [B, T, D], stats of this layer)."""

    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x_BTD):
        cfg, moe = self.cfg, self.cfg.moe
        B, T, D = x_BTD.shape
        E, K = moe.num_experts, moe.top_k
        F = moe.d_ff or cfg.d_ff
        param_dtype, compute = dtype(cfg.param_dtype), dtype(cfg.dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

        # The router is small (D x E) and every device needs all of it: replicated.
        router_DE = self.param("router", _init(cfg.init_std, (None, None)), (D, E),
                               param_dtype)
        logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32),
                                jnp.asarray(router_DE, jnp.float32))
        weights_BTK, experts_BTK, probs_BTE = route(
            logits_BTE, top_k=K, score=moe.router, renormalize=moe.renormalize)

        gated = cfg.mlp == "swiglu"
        wi_up = self.param("wi_up", _init(cfg.init_std, experts.EXPERT_IN), (E, D, F),
                           param_dtype)
        wi_gate = (self.param("wi_gate", _init(cfg.init_std, experts.EXPERT_IN), (E, D, F),
                              param_dtype) if gated else None)
        wo = self.param("wo", _init(out_std, experts.EXPERT_OUT), (E, F, D), param_dtype)
        cast = lambda w: None if w is None else jnp.asarray(w, compute)  # noqa: E731
        x_BTD = x_BTD.astype(compute)

        if moe.dispatch == "dropless":
            y_BTD = experts.dropless(x_BTD, experts_BTK, weights_BTK, cast(wi_gate),
                                     cast(wi_up), cast(wo))
            dropped = jnp.zeros((), jnp.float32)
        else:
            y_BTD, dropped = self._capacity(x_BTD, experts_BTK, weights_BTK,
                                            cast(wi_gate), cast(wi_up), cast(wo))
        if moe.num_shared_experts:
            from jaxscale.models.decoder import Mlp

            shared = Mlp(cfg, self.deterministic, d_ff=F * moe.num_shared_experts, name="shared")
            y_BTD = y_BTD + shared(x_BTD)
        y_BTD = checkpoint_name(y_BTD, remat.MLP_OUT)
        y_BTD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y_BTD)
        stats = {
            "balance": load_balancing_loss(probs_BTE, experts_BTK),
            "router_z": router_z_loss(logits_BTE),
            "dropped": dropped,
            "load": expert_load(experts_BTK, E),
        }
        return y_BTD, stats

    def _capacity(self, x_BTD, experts_BTK, weights_BTK, wi_gate, wi_up, wo):
        moe = self.cfg.moe
        B, T, _ = x_BTD.shape
        slots = capacity(T, moe.top_k, moe.num_experts, moe.capacity_factor)
        dispatch_BTEC, combine_BTEC, dropped_BTK = capacity_routing(
            experts_BTK, weights_BTK, moe.num_experts, slots)
        dispatch_BTEC = constrain(dispatch_BTEC, ("batch", "length", "act_expert", None))
        x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC.astype(x_BTD.dtype), x_BTD)
        x_EBCD = constrain(x_EBCD, ("act_expert", "act_expert_batch", None, "act_embed"))
        up_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, wi_up)
        if wi_gate is not None:
            gate_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, wi_gate)
            h_EBCF = jax.nn.silu(gate_EBCF) * up_EBCF
        else:
            h_EBCF = jax.nn.gelu(up_EBCF, approximate=False)
        h_EBCF = constrain(h_EBCF, ("act_expert", "act_expert_batch", None, "act_mlp"))
        y_EBCD = jnp.einsum("ebcf,efd->ebcd", h_EBCF, wo)
        y_EBCD = constrain(y_EBCD, ("act_expert", "act_expert_batch", None, "act_embed"))
        y_BTD = jnp.einsum("ebcd,btec->btd", y_EBCD, combine_BTEC.astype(y_EBCD.dtype))
        y_BTD = constrain(y_BTD, ("batch", "length", "act_embed"))
        return y_BTD, jnp.mean(dropped_BTK.astype(jnp.float32))


def summarize(module: nn.Module, cfg: ModelConfig, stats: dict) -> None:
    """Sow the MoE losses and metrics of a model's layers (stats stacked [L_moe, ...]).

    The weighted losses go to "aux_loss" (the objective adds them), the unweighted values and the
    per-expert load to "metrics".
    """
    moe = cfg.moe
    mean = {k: jnp.mean(v, axis=0) for k, v in stats.items()}
    num_layers = stats["balance"].shape[0]
    module.sow("aux_loss", "moe_balance_loss", moe.aux_loss * mean["balance"] * num_layers)
    module.sow("aux_loss", "moe_router_z_loss", moe.z_loss * mean["router_z"] * num_layers)
    module.sow("metrics", "moe_balance", mean["balance"])
    module.sow("metrics", "moe_router_z", mean["router_z"])
    module.sow("metrics", "moe_dropped", mean["dropped"])
    load_E = mean["load"]
    module.sow("metrics", "moe_load_max", jnp.max(load_E))
    module.sow("metrics", "moe_load_min", jnp.min(load_E))
    if moe.num_experts <= PER_EXPERT_METRICS:
        for e in range(moe.num_experts):
            module.sow("metrics", f"moe_load_e{e}", load_E[e])
