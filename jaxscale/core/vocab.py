"""Cross-entropy over a vocabulary, whole or a chunk of positions at a time.

`cross_entropy_sums` takes the logits. `chunked_cross_entropy_sums` takes what a decoder
returns in their place, `HeadInputs` (the final-normed hidden states and the vocabulary
projection), and computes the logits of `chunk` positions at a time inside a `lax.scan`: one
chunk's [B, chunk, V] float32 logits exist at a time, so the [B, T, V] logits and their gradient
never exist at once. Under differentiation (a custom VJP) each chunk's softmax gradient is
projected onto the hidden states and the projection's weights while the chunk's logits exist,
so nothing is recomputed in the backward pass: the logits cost one matmul, their gradient two,
as for the whole-vocabulary loss. The sums agree with the whole-vocabulary ones to float32
rounding (they are added chunk by chunk); the projection is the decoder's own (same dtype
promotion), so each chunk's logits are the ones the decoder would have returned.

Array suffixes: B batch, T positions, C positions of a chunk, N chunks, D model width,
V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxscale.core.sharding import constrain

LOGITS_AXES = ("batch", "length", "act_vocab")


@struct.dataclass
class HeadInputs:
    """The decoder's output when the loss projects onto the vocabulary itself."""

    hidden_BTD: jax.Array  # after the final norm
    kernel: jax.Array  # lm_head's [D, V] kernel, or the tied [V, D] embedding
    bias_V: jax.Array | None  # lm_head's bias (model.use_bias), else None
    tied: bool = struct.field(pytree_node=False)  # kernel is the [V, D] embedding
    dtype: Any = struct.field(pytree_node=False)  # the compute dtype of the projection
    # the dtype the kernel's gradient leaves its matmul in (model.weight_grad_dtype); None: dtype
    grad_dtype: Any = struct.field(pytree_node=False, default=None)

    def logits(self, hidden_BCD: jax.Array) -> jax.Array:
        """The logits of some positions, as the decoder's head computes them (nn.Embed.attend
        when tied, nn.DenseGeneral otherwise): inputs promoted to the compute dtype."""
        x_BCD = hidden_BCD.astype(self.dtype)
        kernel = self.kernel.astype(self.dtype)
        if self.tied:
            return jnp.dot(x_BCD, kernel.T)
        logits_BCV = jax.lax.dot_general(x_BCD, kernel, (((x_BCD.ndim - 1,), (0,)), ((), ())))
        if self.bias_V is not None:
            logits_BCV = logits_BCV + self.bias_V.astype(self.dtype)
        return logits_BCV


def cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
                       weight_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted cross-entropy, sum of weighted logsumexp^2), in float32.

    `targets_BT` must be valid ids (callers mask ignored positions through `weight_BT`). A
    one-hot contraction keeps the vocabulary dimension shardable (no gather across devices).
    """
    _, sums = _lse_and_sums(logits_BTV.astype(jnp.float32), targets_BT, weight_BT)
    return sums


def _lse_and_sums(logits_BTV, targets_BT, weight_BT):
    """(logsumexp of float32 logits, (cross-entropy sum, logsumexp^2 sum))."""
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.einsum(
        "btv,btv->bt", logits_BTV, jax.nn.one_hot(targets_BT, logits_BTV.shape[-1])
    )
    return lse_BT, (jnp.sum((lse_BT - target_logit_BT) * weight_BT),
                    jnp.sum(jnp.square(lse_BT) * weight_BT))


def chunk_length(seq_len: int, chunk: int) -> int:
    """The largest divisor of `seq_len` that is at most `chunk` (chunks tile the sequence)."""
    return max(c for c in range(1, min(chunk, seq_len) + 1) if seq_len % c == 0)


def chunked_cross_entropy_sums(head: HeadInputs, targets_BT: jax.Array, weight_BT: jax.Array,
                               chunk: int, z_loss: float = 0.0
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, cross-entropy, logsumexp^2) sums of `head`'s logits, ``objective = ce +
    z_loss * z``, computed `chunk_length(T, chunk)` positions at a time.

    Only the objective is differentiable (the other two are sums to report). Its gradient is
    formed in the forward pass, chunk by chunk, while each chunk's logits exist: the softmax's
    gradient is projected back onto the hidden states and the projection's weights at once, so
    the backward pass has nothing to recompute and the logits' FLOPs are spent once.
    """
    B, T, D = head.hidden_BTD.shape
    C = chunk_length(T, chunk)
    V = head.kernel.shape[0 if head.tied else 1]

    def split(x_BT):  # [B, T, ...] -> [N, B, C, ...]: the scan runs over chunks of positions
        return jnp.swapaxes(x_BT.reshape(B, T // C, C, *x_BT.shape[2:]), 0, 1)

    def chunk_sums(kernel, bias_V, hidden_BCD, targets_BC, weight_BC):
        """A chunk's float32 logits (as the decoder's head computes them, then promoted), their
        logsumexp and their two sums."""
        projection = head.replace(hidden_BTD=None, kernel=kernel, bias_V=bias_V)
        logits_BCV = constrain(projection.logits(hidden_BCD), LOGITS_AXES).astype(jnp.float32)
        return logits_BCV, *_lse_and_sums(logits_BCV, targets_BC, weight_BC)

    def sums_only(kernel, bias_V, hidden_BTD):
        def body(carry, xs):
            _, _, (ce, z) = chunk_sums(kernel, bias_V, *xs)
            return (carry[0] + ce, carry[1] + z), None

        zero = jnp.zeros((), jnp.float32)
        (ce, z), _ = jax.lax.scan(
            body, (zero, zero), (split(hidden_BTD), split(targets_BT), split(weight_BT)))
        return ce + z_loss * z, ce, z

    def with_gradient(kernel, bias_V, hidden_BTD):
        """The sums, and the objective's gradient w.r.t. the kernel, bias and hidden states."""
        cast = head.dtype
        kernel_axes = ("vocab", "embed") if head.tied else ("embed", "vocab")
        # One copy of the weights, gathered over the model width (FSDP) and still split over
        # the vocabulary (tensor), serves both the logits and the hidden states' gradient
        k = constrain(kernel.astype(cast), ("vocab", None) if head.tied else (None, "vocab"))

        def body(carry, xs):
            ce_acc, z_acc, dkernel, dbias = carry
            hidden_BCD, targets_BC, weight_BC = xs
            logits_BCV, lse_BC, (ce, z) = chunk_sums(k, bias_V, *xs)
            probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
            # d(ce + z_loss * lse^2) / d logits, weighted; cast to the compute dtype as the
            # transpose of the head's float32 promotion would
            dlogits_BCV = (probs_BCV * (1.0 + 2.0 * z_loss * lse_BC[..., None])
                           - jax.nn.one_hot(targets_BC, V)) * weight_BC[..., None]
            dlogits_BCV = constrain(dlogits_BCV.astype(cast), LOGITS_AXES)
            x_BCD = hidden_BCD.astype(cast)
            grad = head.grad_dtype or cast
            if head.tied:  # logits = x @ k.T, k [V, D]
                dx_BCD = jnp.einsum("bcv,vd->bcd", dlogits_BCV, k)
                dk = jnp.einsum("bcv,bcd->vd", dlogits_BCV, x_BCD, preferred_element_type=grad)
            else:  # logits = x @ k, k [D, V]
                dx_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, k)
                dk = jnp.einsum("bcd,bcv->dv", x_BCD, dlogits_BCV, preferred_element_type=grad)
            # accumulated in the kernel's own sharding (FSDP: each chunk's part reduce-scattered)
            dkernel = constrain(dkernel + dk.astype(kernel.dtype), kernel_axes)
            if bias_V is not None:
                dbias = dbias + jnp.sum(dlogits_BCV, axis=(0, 1)).astype(bias_V.dtype)
            carry = (ce_acc + ce, z_acc + z, dkernel, dbias)
            return carry, dx_BCD.astype(hidden_BCD.dtype)

        zero = jnp.zeros((), jnp.float32)
        dbias = None if bias_V is None else jnp.zeros_like(bias_V)
        (ce, z, dkernel, dbias), dx_NBCD = jax.lax.scan(
            body, (zero, zero, jnp.zeros_like(kernel), dbias),
            (split(hidden_BTD), split(targets_BT), split(weight_BT)))
        dhidden_BTD = jnp.swapaxes(dx_NBCD, 0, 1).reshape(B, T, D)
        return (ce + z_loss * z, ce, z), (dkernel, dbias, dhidden_BTD)

    @jax.custom_vjp
    def fused(kernel, bias_V, hidden_BTD):
        return sums_only(kernel, bias_V, hidden_BTD)

    def backward(grads, cotangents):
        g = cotangents[0]  # the objective's; the reported sums are not differentiated
        return jax.tree_util.tree_map(lambda x: None if x is None else g * x, grads,
                                      is_leaf=lambda x: x is None)

    fused.defvjp(with_gradient, backward)
    objective, ce, z = fused(head.kernel, head.bias_V, head.hidden_BTD)
    return objective, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)
