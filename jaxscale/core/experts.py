"""Dropless expert dispatch: routed tokens sorted by expert and run with grouped matmuls.

`dropless(x, experts, weights, wi_gate, wi_up, wo)` computes ``y[n] = sum_k weights[n, k] *
mlp_{experts[n, k]}(x[n])`` for every token, with no capacity and no token dropped:

- one device (or outside `activation_sharding`): the token-expert assignments are sorted by
  expert and each expert's contiguous rows are multiplied by its weights with one grouped matmul
  (`jax.lax.ragged_dot`; a one-hot fallback where the installed jax lacks it);
- on a mesh: a `shard_map` over every mesh axis. Tokens stay split over the batch axes, expert
  weights over the axes their logical names map to (``("expert", "embed", "mlp")``): the expert
  dimension's axis holds different experts, the embed dimension's axes are gathered inside
  (FSDP) and the MLP dimension's axes split every expert's hidden units (tensor parallelism, one
  psum at the end). Assignments travel to the shard that owns their expert and back with two
  ``all_to_all`` over the expert axis. The partitioner alone would gather every token onto every
  expert shard instead.

Static shapes leave no exact buffer for a dropless exchange: each destination gets room for all
of a device's assignments (``tokens x top_k``), the worst case. The grouped matmul only reads the
rows that hold assignments; the rest are padding.

No mesh axis is named here: the axes come from the sharding rules in effect.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxscale.core.sharding.manual import (
    current_context,
    partition_spec,
    shard_map,
    spec_axes,
)
from jaxscale.errors import ShardingError

# Logical names of the tensors the dispatch takes.
TOKENS = ("batch", "length", "act_embed")
ROUTES = ("batch", "length", None)
EXPERT_IN = ("expert", "embed", "mlp")  # wi_gate, wi_up [E, D, F]
EXPERT_OUT = ("expert", "mlp", "embed")  # wo [E, F, D]

HAS_RAGGED_DOT = hasattr(jax.lax, "ragged_dot")

# While set, grouped matmuls compile as one dense [M, D] x [D, F] matmul (`footprint_standin`).
_STANDIN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jaxscale_grouped_matmul_standin", default=False)


@contextlib.contextmanager
def footprint_standin() -> Iterator[None]:
    """While tracing inside, every grouped matmul is one dense matmul of the same shapes.

    The CPU compiler has no grouped-matmul kernel: it expands `ragged_dot` into dense work over
    every expert (E copies of the rows). `jaxscale plan` compiles for GPUs and TPUs, whose
    kernels read each row once, so it compiles this stand-in, with their FLOPs and buffers.
    Its values are meaningless: only ever compiled, never run.
    """
    token = _STANDIN.set(True)
    try:
        yield
    finally:
        _STANDIN.reset(token)


def grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   ragged: bool | None = None) -> jax.Array:
    """Rows of `x` in E contiguous groups, group e times ``w[e]``; rows past the groups are 0.

    Args:
      ragged: use `jax.lax.ragged_dot` (default: where jax has it); False is the fallback, a
        one-hot contraction that does E dense matmuls.
    """
    if _STANDIN.get():
        return x_MD @ w_EDF[0]
    if HAS_RAGGED_DOT if ragged is None else ragged:
        return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E.astype(jnp.int32))
    ends_E = jnp.cumsum(group_sizes_E)
    group_M = jnp.searchsorted(ends_E, jnp.arange(x_MD.shape[0]), side="right")
    onehot_ME = jax.nn.one_hot(group_M, w_EDF.shape[0], dtype=x_MD.dtype)
    return jnp.einsum("me,md,edf->mf", onehot_ME, x_MD, w_EDF)


def expert_mlp(x_MD, group_sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, *, ragged=None):
    """The experts' MLPs over rows grouped by expert: SwiGLU with a gate, else GELU."""
    up_MF = grouped_matmul(x_MD, wi_up_EDF, group_sizes_E, ragged=ragged)
    if wi_gate_EDF is not None:
        gate_MF = grouped_matmul(x_MD, wi_gate_EDF, group_sizes_E, ragged=ragged)
        h_MF = jax.nn.silu(gate_MF) * up_MF
    else:
        h_MF = jax.nn.gelu(up_MF, approximate=False)
    return grouped_matmul(h_MF, wo_EFD, group_sizes_E, ragged=ragged)


def _combine(y_AD: jax.Array, order_A: jax.Array, weights_NK: jax.Array) -> jax.Array:
    """Assignment outputs in sorted order -> per-token weighted sums [N, D] (float32 weights)."""
    N, K = weights_NK.shape
    y_AD = jnp.zeros_like(y_AD).at[order_A].set(y_AD)
    y_NKD = y_AD.reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK.astype(jnp.float32))


def dropless_local(x_ND, experts_NK, weights_NK, wi_gate_EDF, wi_up_EDF, wo_EFD, *,
                   ragged=None) -> jax.Array:
    """Dropless MoE on one device's tokens with all experts present. Returns [N, D] in x's dtype."""
    N, K = experts_NK.shape
    E = wi_up_EDF.shape[0]
    flat_A = experts_NK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    x_AD = x_ND[order_A // K]
    group_sizes_E = jnp.bincount(flat_A, length=E)
    y_AD = expert_mlp(x_AD, group_sizes_E, wi_gate_EDF, wi_up_EDF, wo_EFD, ragged=ragged)
    return _combine(y_AD, order_A, weights_NK).astype(x_ND.dtype)


def _exchange_local(x_ND, experts_NK, weights_NK, wi_gate, wi_up, wo, *, expert_axis, shards,
                    ragged) -> jax.Array:
    """One device's share of expert-parallel dropless MoE (inside shard_map).

    Each of this device's N*K assignments goes to the expert shard that owns its expert (slot
    `rank` of a buffer of N*K per destination), all_to_all over `expert_axis`, the received rows
    are grouped by local expert and run, and the results travel back the same way.
    """
    N, K = experts_NK.shape
    A = N * K
    E_local = wi_up.shape[0]
    flat_A = experts_NK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    sorted_A = flat_A[order_A]
    dest_A = sorted_A // E_local
    counts_S = jnp.bincount(dest_A, length=shards)
    rank_A = jnp.arange(A) - (jnp.cumsum(counts_S) - counts_S)[dest_A]
    send_SAD = jnp.zeros((shards, A, x_ND.shape[1]), x_ND.dtype).at[dest_A, rank_A].set(
        x_ND[order_A // K])
    # Empty slots carry the id E_local: they sort after every local expert and join no group.
    send_SA = jnp.full((shards, A), E_local, jnp.int32).at[dest_A, rank_A].set(
        (sorted_A % E_local).astype(jnp.int32))
    recv_SAD = jax.lax.all_to_all(send_SAD, expert_axis, 0, 0)
    recv_SA = jax.lax.all_to_all(send_SA, expert_axis, 0, 0)

    ids_R = recv_SA.reshape(-1)
    local_order_R = jnp.argsort(ids_R, stable=True)
    group_sizes_E = jnp.bincount(ids_R, length=E_local + 1)[:E_local]
    rows_RD = recv_SAD.reshape(shards * A, -1)[local_order_R]
    out_RD = expert_mlp(rows_RD, group_sizes_E, wi_gate, wi_up, wo, ragged=ragged)
    out_RD = jnp.where((ids_R[local_order_R] < E_local)[:, None], out_RD, 0)
    out_SAD = jnp.zeros_like(out_RD).at[local_order_R].set(out_RD).reshape(shards, A, -1)

    back_SAD = jax.lax.all_to_all(out_SAD, expert_axis, 0, 0)
    y_AD = back_SAD[dest_A, rank_A]
    return _combine(y_AD, order_A, weights_NK)


def dropless(x_BTD, experts_BTK, weights_BTK, wi_gate_EDF, wi_up_EDF, wo_EFD, *,
             ragged: bool | None = None) -> jax.Array:
    """Dropless MoE over a batch (see the module docstring). `wi_gate_EDF` is None for GELU.

    Returns:
      [B, T, D] in x's dtype: each token's weighted sum of its experts' outputs.
    """
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    context = current_context()
    if context is None:
        y_ND = dropless_local(x_BTD.reshape(B * T, D), experts_BTK.reshape(B * T, K),
                              weights_BTK.reshape(B * T, K), wi_gate_EDF, wi_up_EDF, wo_EFD,
                              ragged=ragged)
        return y_ND.reshape(B, T, D)
    mesh, rules = context
    tokens = spec_axes(TOKENS, rules, mesh)
    w_in, w_out = spec_axes(EXPERT_IN, rules, mesh), spec_axes(EXPERT_OUT, rules, mesh)
    expert_axes, embed_axes, mlp_axes = w_in
    if tokens[2]:
        raise ShardingError(
            f"mixture-of-experts tokens have their embed dimension split over {tokens[2]}; the "
            "dropless dispatch needs act_embed unsharded"
        )
    token_axes = tokens[0] + tokens[1]
    if len(expert_axes) > 1:
        raise ShardingError(
            f"expert weights are split over several mesh axes {expert_axes}; the dropless "
            "dispatch exchanges tokens over one expert axis"
        )
    if expert_axes and expert_axes[0] not in token_axes:
        raise ShardingError(
            f"expert weights are split over mesh axis {expert_axes[0]!r} but the tokens are not "
            f"(batch and length over {token_axes}); the dropless dispatch sends each device's "
            f"tokens to the experts' shards, so map 'batch' to {expert_axes[0]!r} too"
        )
    expert_axis = expert_axes[0] if expert_axes else None
    shards = mesh.shape[expert_axis] if expert_axis else 1

    def local(x, experts, weights, wi_up, wo, wi_gate=None):
        # FSDP inside: gather the embed dimension of this shard's experts.
        if embed_axes:
            gather = lambda w, axis: jax.lax.all_gather(w, embed_axes, axis=axis, tiled=True)  # noqa: E731
            wi_up = gather(wi_up, 1)
            wi_gate = None if wi_gate is None else gather(wi_gate, 1)
            wo = gather(wo, 2)
        b, t, d = x.shape
        k = experts.shape[-1]
        args = (x.reshape(b * t, d), experts.reshape(b * t, k), weights.reshape(b * t, k),
                wi_gate, wi_up, wo)
        if shards > 1:
            y = _exchange_local(*args, expert_axis=expert_axis, shards=shards, ragged=ragged)
        else:
            y = dropless_local(*args, ragged=ragged).astype(jnp.float32)
        if mlp_axes:  # each shard of the hidden units gave a partial sum
            y = jax.lax.psum(y, mlp_axes)
        return y.astype(x.dtype).reshape(b, t, d)

    x_spec = partition_spec(tokens)
    route_spec = partition_spec((*tokens[:2], ()))
    in_spec = partition_spec(w_in)
    out_spec = partition_spec(w_out)
    args = (x_BTD, experts_BTK, weights_BTK, wi_up_EDF, wo_EFD)
    specs = (x_spec, route_spec, route_spec, in_spec, out_spec)
    if wi_gate_EDF is not None:
        args, specs = args + (wi_gate_EDF,), specs + (in_spec,)
    return shard_map(local, mesh, in_specs=specs, out_specs=x_spec)(*args)
