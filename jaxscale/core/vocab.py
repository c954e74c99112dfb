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
promotion), so each chunk's logits are the ones the decoder would have returned. Under FSDP the
loss is vocabulary-parallel (`VocabSplit`): the hidden states move, the weights stay split.

Array suffixes: B batch, T positions, C positions of a chunk, N chunks, D model width,
V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from jaxscale.core.sharding import axes_of, constrain
from jaxscale.core.sharding.rules import constrain_spec, context_spec, current_context

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

    @property
    def kernel_axes(self) -> tuple[str, str]:
        """The kernel's logical axes, as the decoder annotates them."""
        return ("vocab", "embed") if self.tied else ("embed", "vocab")

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


@struct.dataclass
class VocabSplit:
    """The vocabulary-parallel layout of the chunked loss: where the projection's weights are
    split over mesh axes that also carry the batch (FSDP), the loss moves the hidden states
    instead of the weights. Each device projects the positions of every example on those axes
    onto its own slice of the vocabulary; the logsumexp is summed across the slices and the
    hidden states' gradient reduce-scattered back, so the weights are never gathered and their
    gradient is formed where they live."""

    rows: PartitionSpec = struct.field(pytree_node=False)  # [B, C, ...]: hidden states, targets
    logits: PartitionSpec = struct.field(pytree_node=False)  # [B, C, V]
    kernel: PartitionSpec = struct.field(pytree_node=False)  # the weights, split over V
    bias: PartitionSpec = struct.field(pytree_node=False)  # [V], split as the weights' V


def vocab_split(head: HeadInputs) -> VocabSplit | None:
    """The vocabulary-parallel layout for `head` under the enclosing activation sharding, or
    None: outside one, where the weights are not split over any axis of the batch, or where
    the vocabulary does not divide over the axes it would take."""
    context = current_context()
    if context is None:
        return None
    mesh = context[0]
    vocab_dim = head.kernel_axes.index("vocab")
    kernel_spec = context_spec(head.kernel_axes)
    batch_spec = context_spec(("batch", "length"))
    batch = axes_of(batch_spec[0])
    split = {a for target in kernel_spec for a in axes_of(target)}
    moved = tuple(a for a in batch if a in split and mesh.shape[a] > 1)
    if not moved:
        return None
    vocab = axes_of(kernel_spec[vocab_dim])
    vocab += tuple(a for a in moved if a not in vocab)
    if head.kernel.shape[vocab_dim] % math.prod(mesh.shape[a] for a in vocab):
        return None
    rest = tuple(a for a in batch if a not in moved) or None
    kernel = (vocab, None) if head.tied else (None, vocab)
    return VocabSplit(rows=PartitionSpec(rest, batch_spec[1]),
                      logits=PartitionSpec(rest, batch_spec[1], vocab),
                      kernel=PartitionSpec(*kernel), bias=PartitionSpec(vocab))


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

    def chunks(x_BT):  # [B, T, ...] -> [N, B, C, ...]: the scan runs over chunks of positions
        return jnp.swapaxes(x_BT.reshape(B, T // C, C, *x_BT.shape[2:]), 0, 1)

    split = vocab_split(head)

    def to_logits_layout(x_BCV):
        if split is None:
            return constrain(x_BCV, LOGITS_AXES)
        return constrain_spec(x_BCV, split.logits)

    def chunk_sums(kernel, bias_V, hidden_BCD, targets_BC, weight_BC):
        """A chunk's float32 logits (as the decoder's head computes them, then promoted), their
        logsumexp and their two sums; vocabulary-parallel, the chunk's positions of the
        examples on the moved axes (gathered in the compute dtype)."""
        if split is not None:
            hidden_BCD = constrain_spec(hidden_BCD.astype(head.dtype), split.rows)
            targets_BC, weight_BC = (constrain_spec(x, split.rows)
                                     for x in (targets_BC, weight_BC))
        projection = head.replace(hidden_BTD=None, kernel=kernel, bias_V=bias_V)
        logits_BCV = to_logits_layout(projection.logits(hidden_BCD)).astype(jnp.float32)
        return (logits_BCV, hidden_BCD, targets_BC, weight_BC,
                *_lse_and_sums(logits_BCV, targets_BC, weight_BC))

    def sums_only(kernel, bias_V, hidden_BTD):
        def body(carry, xs):
            *_, (ce, z) = chunk_sums(kernel, bias_V, *xs)
            return (carry[0] + ce, carry[1] + z), None

        zero = jnp.zeros((), jnp.float32)
        (ce, z), _ = jax.lax.scan(
            body, (zero, zero), (chunks(hidden_BTD), chunks(targets_BT), chunks(weight_BT)))
        return ce + z_loss * z, ce, z

    def with_gradient(kernel, bias_V, hidden_BTD):
        """The sums, and the objective's gradient w.r.t. the kernel, bias and hidden states."""
        cast = head.dtype

        def as_kernel(x):  # where the weights' gradient accumulates
            if split is None:  # the kernel's sharding (FSDP: each chunk's part reduce-scattered)
                return constrain(x, head.kernel_axes)
            return constrain_spec(x, split.kernel)  # where each slice of the vocabulary lives

        def as_bias(x):  # the bias (and its gradient) split as the weights' vocabulary
            return x if split is None or x is None else constrain_spec(x, split.bias)

        if split is None:
            # One copy of the weights, gathered over the model width (FSDP) and still split
            # over the vocabulary (tensor), serves the logits and the hidden states' gradient
            k = constrain(kernel.astype(cast), ("vocab", None) if head.tied else (None, "vocab"))
        else:  # split over the vocabulary on the moved axes as well: an all-to-all, or nothing
            k = constrain_spec(kernel.astype(cast), split.kernel)
        bias_V = as_bias(bias_V)

        def body(carry, xs):
            ce_acc, z_acc, dkernel, dbias = carry
            dtype_BCD = xs[0].dtype
            logits_BCV, hidden_BCD, targets_BC, weight_BC, lse_BC, (ce, z) = chunk_sums(
                k, bias_V, *xs)
            probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
            # d(ce + z_loss * lse^2) / d logits, weighted; cast to the compute dtype as the
            # transpose of the head's float32 promotion would
            dlogits_BCV = (probs_BCV * (1.0 + 2.0 * z_loss * lse_BC[..., None])
                           - jax.nn.one_hot(targets_BC, V)) * weight_BC[..., None]
            dlogits_BCV = to_logits_layout(dlogits_BCV.astype(cast))
            x_BCD = hidden_BCD.astype(cast)
            grad = head.grad_dtype or cast
            # vocabulary-parallel, each device's dx is a partial sum over its slice of the
            # vocabulary: summed across them in float32, then rounded as one matmul would be
            partial = jnp.float32 if split is not None else None
            if head.tied:  # logits = x @ k.T, k [V, D]
                dx_BCD = jnp.einsum("bcv,vd->bcd", dlogits_BCV, k, preferred_element_type=partial)
                dk = jnp.einsum("bcv,bcd->vd", dlogits_BCV, x_BCD, preferred_element_type=grad)
            else:  # logits = x @ k, k [D, V]
                dx_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, k, preferred_element_type=partial)
                dk = jnp.einsum("bcd,bcv->dv", x_BCD, dlogits_BCV, preferred_element_type=grad)
            dkernel = as_kernel(dkernel + dk.astype(kernel.dtype))
            if split is not None:  # back to the examples' devices: a reduce-scatter
                dx_BCD = constrain(dx_BCD, ("batch", "length", "act_embed"))
            if bias_V is not None:
                dbias = as_bias(dbias + jnp.sum(dlogits_BCV, axis=(0, 1)).astype(bias_V.dtype))
            carry = (ce_acc + ce, z_acc + z, dkernel, dbias)
            return carry, dx_BCD.astype(dtype_BCD)

        zero = jnp.zeros((), jnp.float32)
        dbias = None if bias_V is None else as_bias(jnp.zeros_like(bias_V))
        (ce, z, dkernel, dbias), dx_NBCD = jax.lax.scan(
            body, (zero, zero, as_kernel(jnp.zeros_like(kernel)), dbias),
            (chunks(hidden_BTD), chunks(targets_BT), chunks(weight_BT)))
        dkernel = constrain(dkernel, head.kernel_axes)  # back to the weights' own sharding
        if dbias is not None:
            dbias = constrain(dbias, ("vocab",))
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
