"""Cross-entropy over a vocabulary, whole or a chunk of positions at a time.

`cross_entropy_sums` takes the logits. `chunked_cross_entropy_sums` takes what a decoder
returns in their place, `HeadInputs` (the final-normed hidden states and the vocabulary
projection), and computes the logits of `chunk` positions at a time inside a `lax.scan` whose
body is rematerialised: the forward pass keeps one chunk's [B, chunk, V] float32 logits, the
backward pass recomputes them chunk by chunk, so the [B, T, V] logits and their gradient never
exist at once. The sums agree with the whole-vocabulary ones to float32 rounding (they are
added chunk by chunk); the projection is the decoder's own (same dtype promotion), so each
chunk's logits are the ones the decoder would have returned.

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
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.einsum(
        "btv,btv->bt", logits_BTV, jax.nn.one_hot(targets_BT, logits_BTV.shape[-1])
    )
    return jnp.sum((lse_BT - target_logit_BT) * weight_BT), jnp.sum(jnp.square(lse_BT) * weight_BT)


def chunk_length(seq_len: int, chunk: int) -> int:
    """The largest divisor of `seq_len` that is at most `chunk` (chunks tile the sequence)."""
    return max(c for c in range(1, min(chunk, seq_len) + 1) if seq_len % c == 0)


def chunked_cross_entropy_sums(head: HeadInputs, targets_BT: jax.Array, weight_BT: jax.Array,
                               chunk: int) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sums` of `head`'s logits, computed `chunk_length(T, chunk)` positions at
    a time (see the module docstring)."""
    B, T, D = head.hidden_BTD.shape
    C = chunk_length(T, chunk)

    def split(x_BT):  # [B, T, ...] -> [N, B, C, ...]: the scan runs over chunks of positions
        return jnp.swapaxes(x_BT.reshape(B, T // C, C, *x_BT.shape[2:]), 0, 1)

    @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them
    def sums(kernel, bias_V, hidden_BCD, targets_BC, weight_BC):
        projection = head.replace(hidden_BTD=None, kernel=kernel, bias_V=bias_V)
        logits_BCV = constrain(projection.logits(hidden_BCD), LOGITS_AXES)
        return cross_entropy_sums(logits_BCV, targets_BC, weight_BC)

    def body(carry, chunk_NBC):
        ce, z = sums(head.kernel, head.bias_V, *chunk_NBC)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(
        body, (zero, zero), (split(head.hidden_BTD), split(targets_BT), split(weight_BT)))
    return ce_sum, z_sum
