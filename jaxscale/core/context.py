"""Context parallelism: causal attention over a sequence split across devices.

`context_attention(q, k, v, segment_ids, mode=..., balanced=..., implementation=...)` takes the
same arrays as `jaxscale.models.decoder.attention`, sharded by the same logical names, and
attends across the devices that hold parts of the length dimension:

- "ring": a `shard_map` over the mesh. Each device keeps its queries and passes its keys and
  values (and their segment ids) round the ring of the mesh axis that "length" maps to, one
  `ppermute` per step, issued before the step's math so that the transfer overlaps it. Scores
  are accumulated with an online softmax in float32, block by block: a device holds the scores
  of a few [C, C] blocks at a time, never a [T/shards, T] row of them, in the forward or (every
  block update is rematerialised) the backward pass. Blocks that causality masks entirely are
  skipped.
- "allgather": keys and values are constrained whole along the length on every device and the
  partitioner gathers them; each device attends with its own queries. Simpler, and the
  collective is one all-gather, but every device holds all T keys and [T/shards, T] scores.

Causal ring attention does unequal work per device when each holds a contiguous block (the last
one attends to every key, the first only to its own). With ``balanced=True`` the sequence is laid
out by `balanced_order`: in 2*shards chunks, device i holding chunks i and 2*shards-1-i, so every
device computes the same number of blocks (`unmasked_blocks`). The caller permutes the sequence
into that layout once (tokens, positions, segment ids, targets) and the model runs unchanged;
causality follows the global token index of the layout, never the position values.

No mesh axis is named here: the axes come from the sharding rules in effect.

Shape legend: B batch, T query length, S key/value length, N query heads, K key/value heads,
G = N / K query heads per key/value head, H head dim, C tokens per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.core.sharding.manual import (
    current_context,
    partition_spec,
    shard_map,
    spec_axes,
)
from jaxscale.core.sharding.rules import constrain, named_sharding
from jaxscale.errors import ShardingError

__all__ = [
    "MODES", "balanced_order", "context_attention", "inverse_order", "ring_attention_local",
    "unmasked_blocks",
]

MODES = ("ring", "allgather")

# Logical names of the attention inputs, as the decoder constrains them.
QUERIES = ("batch", "length", "act_heads", "act_head_dim")
KEYS = ("batch", "length", "act_kv_heads", "act_head_dim")
SEGMENTS = ("batch", "length")

# The running max starts here rather than at -inf, so that exp(m_old - m_new) of a row that has
# seen no allowed key yet is exp(0), never exp(nan).
_NEG = -0.7 * float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------
# Layout.


def balanced_order(seq_len: int, shards: int) -> np.ndarray:
    """The load-balanced layout of a causal sequence over `shards` devices.

    The sequence is cut into 2*shards equal chunks and device i holds chunks i and
    2*shards-1-i, in that order: ``x_layout = x[:, order]``, where ``order[j]`` is the original
    index of layout position j. With one shard it is the identity.

    Raises:
      ValueError: `seq_len` is not divisible by 2*shards.
    """
    if shards < 1 or seq_len % (2 * shards):
        raise ValueError(
            f"balanced_order: seq_len={seq_len} is not divisible by 2 * shards = {2 * shards}"
        )
    chunk = seq_len // (2 * shards)
    chunks = [c for i in range(shards) for c in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def inverse_order(seq_len: int, shards: int) -> np.ndarray:
    """The inverse of `balanced_order`: ``x = x_layout[:, inverse_order(seq_len, shards)]``."""
    return np.argsort(balanced_order(seq_len, shards)).astype(np.int32)


def _chunks_per_device(balanced: bool) -> int:
    return 2 if balanced else 1


def _chunk_id(device, sub: int, shards: int, balanced: bool):
    """Global index of chunk `sub` of `device`'s local block (chunks of T/(2*shards) tokens
    when balanced, else of T/shards). `device` is an int or a traced axis index."""
    if not balanced:
        return device
    return device if sub == 0 else 2 * shards - 1 - device


def _visible(q_chunk, kv_chunk):
    """Whether causality lets any query of chunk `q_chunk` see any key of chunk `kv_chunk`
    (chunks of one size, numbered in sequence order); ints or traced values."""
    return q_chunk >= kv_chunk


def _source(device, step: int, shards: int):
    """The device whose keys and values `device` holds at ring step `step`."""
    return (device - step) % shards


def _block_visible(device, step, q_sub: int, kv_sub: int, shards: int, balanced: bool):
    """Whether `device` computes the block of its query chunk `q_sub` against key chunk
    `kv_sub` of the keys it holds at ring step `step` (ints, or traced in the kernel)."""
    return _visible(_chunk_id(device, q_sub, shards, balanced),
                    _chunk_id(_source(device, step, shards), kv_sub, shards, balanced))


def _static_visible(steps, q_sub: int, kv_sub: int, shards: int,
                    balanced: bool) -> bool | None:
    """`_block_visible` when it is the same on every device at every one of `steps`, else None
    (decided per device at run time)."""
    seen = {bool(_block_visible(d, j, q_sub, kv_sub, shards, balanced))
            for j in steps for d in range(shards)}
    return seen.pop() if len(seen) == 1 else None


def unmasked_blocks(shards: int, balanced: bool) -> list[int]:
    """Per device, how many (query chunk, key chunk) blocks the ring computes over all its steps.

    Balanced, every device computes 2*shards+1 blocks of (T/(2*shards))^2 scores; unbalanced,
    device i computes i+1 blocks of (T/shards)^2.
    """
    n = _chunks_per_device(balanced)
    return [
        sum(bool(_block_visible(d, j, a, b, shards, balanced))
            for j in range(shards) for a in range(n) for b in range(n))
        for d in range(shards)
    ]


# --------------------------------------------------------------------------------------------
# The per-device ring.


def _block_update(carry, q_BCKGH, k_BCKH, v_BCKH, seg_q_BC, seg_kv_BC, q_chunk, kv_chunk):
    """One online-softmax step: the queries of one chunk against the keys of one chunk.

    Args:
      carry: (m_BKGC running max, l_BKGC denominator, acc_BKGCH accumulator), float32.
      q_chunk, kv_chunk: global chunk indices (int32 scalars), for the causal mask.

    Returns:
      The updated carry. Masked scores contribute exactly 0.
    """
    m_BKGC, l_BKGC, acc_BKGCH = carry
    C, H = q_BCKGH.shape[1], q_BCKGH.shape[-1]
    scores_BKGCS = jnp.einsum("bqkgh,bskh->bkgqs", q_BCKGH, k_BCKH,
                              preferred_element_type=jnp.float32) / math.sqrt(H)
    q_pos_C = q_chunk * C + jnp.arange(C)
    kv_pos_S = kv_chunk * C + jnp.arange(C)
    allowed_CS = q_pos_C[:, None] >= kv_pos_S[None, :]
    if seg_q_BC is None:
        allowed_BCS = allowed_CS[None]
    else:
        allowed_BCS = allowed_CS[None] & (seg_q_BC[:, :, None] == seg_kv_BC[:, None, :])
    allowed_B11CS = allowed_BCS[:, None, None]
    scores_BKGCS = jnp.where(allowed_B11CS, scores_BKGCS, _NEG)
    # The output does not depend on the running max: no gradient flows through it.
    m_new_BKGC = jax.lax.stop_gradient(jnp.maximum(m_BKGC, scores_BKGCS.max(axis=-1)))
    probs_BKGCS = jnp.exp(scores_BKGCS - m_new_BKGC[..., None]) * allowed_B11CS
    correction_BKGC = jnp.exp(m_BKGC - m_new_BKGC)
    l_BKGC = l_BKGC * correction_BKGC + probs_BKGCS.sum(axis=-1)
    acc_BKGCH = acc_BKGCH * correction_BKGC[..., None] + jnp.einsum(
        "bkgqs,bskh->bkgqh", probs_BKGCS.astype(v_BCKH.dtype), v_BCKH,
        preferred_element_type=jnp.float32)
    return m_new_BKGC, l_BKGC, acc_BKGCH


def _skip(carry, *args):
    return carry


def _conditional_update(visible, carry, *args):
    """`_block_update` where `visible` (traced: it differs between devices), else `carry`."""
    return jax.lax.cond(visible, _block_update, _skip, carry, *args)


# Each saves only its inputs: the backward pass recomputes every block's scores, so that no
# device holds more than a few blocks of them at a time.
_nothing_saved = jax.checkpoint_policies.nothing_saveable
_block_update_remat = jax.checkpoint(_block_update, policy=_nothing_saved)
_conditional_update_remat = jax.checkpoint(_conditional_update, policy=_nothing_saved)


def ring_attention_local(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
    seg_q_BT: jax.Array | None, seg_kv_BS: jax.Array | None, *,
    axis_name: str, shards: int, balanced: bool,
) -> jax.Array:
    """One device's causal ring attention (call inside `shard_map` over `axis_name`).

    Step j attends to the keys and values of device i-j (mod shards), i this device's index,
    while those of device i-j-1 travel in. The first and last steps are written out (the
    first is the only one with diagonal blocks, the last sends nothing on); the steps between
    run in a `lax.scan`, so their buffers are reused from step to step.

    Args:
      q_BTNH, k_BSKH, v_BSKH: this device's queries, keys and values, T = S = T_global/shards
        positions: chunks (i, 2*shards-1-i) of `balanced_order` when `balanced`, else the
        contiguous block i.
      seg_q_BT, seg_kv_BS: this device's segment ids (attention only within equal ids), both
        or neither.
      axis_name: the mesh axis the sequence is split over; keys travel round it.
      shards: the size of that axis.
      balanced: the layout of the sequence (see above).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    n = _chunks_per_device(balanced)
    if T % n or k_BSKH.shape[1] != T:
        raise ValueError(
            f"ring_attention_local: local queries ({T}) and keys ({k_BSKH.shape[1]}) must have "
            f"one length divisible by {n}"
        )
    C = T // n
    device = jax.lax.axis_index(axis_name)
    q_BCKGH = [q_BTNH[:, a * C:(a + 1) * C].reshape(B, C, K, G, H) for a in range(n)]
    seg_q = [None if seg_q_BT is None else seg_q_BT[:, a * C:(a + 1) * C] for a in range(n)]
    perm = [(s, (s + 1) % shards) for s in range(shards)]

    def ring_step(state, step, steps, send: bool):
        """Attend to the held keys at `step` (an int or traced, one of `steps`)."""
        carry, held = state
        # Start the next step's transfer first, so that it overlaps this step's blocks.
        incoming = jax.lax.ppermute(held, axis_name, perm) if send else held
        held_k_BSKH, held_v_BSKH, held_seg_BS = held
        source = _source(device, step, shards)
        carry = list(carry)
        for a in range(n):
            for b in range(n):
                static = _static_visible(steps, a, b, shards, balanced)
                if static is False:
                    continue
                args = (
                    carry[a], q_BCKGH[a], held_k_BSKH[:, b * C:(b + 1) * C],
                    held_v_BSKH[:, b * C:(b + 1) * C], seg_q[a],
                    None if held_seg_BS is None else held_seg_BS[:, b * C:(b + 1) * C],
                    _chunk_id(device, a, shards, balanced), _chunk_id(source, b, shards, balanced),
                )
                if static:
                    carry[a] = _block_update_remat(*args)
                else:
                    visible = _block_visible(device, step, a, b, shards, balanced)
                    carry[a] = _conditional_update_remat(visible, *args)
        return tuple(carry), incoming

    carry = tuple((jnp.full((B, K, G, C), _NEG, jnp.float32),
                   jnp.zeros((B, K, G, C), jnp.float32),
                   jnp.zeros((B, K, G, C, H), jnp.float32)) for _ in range(n))
    state = ring_step((carry, (k_BSKH, v_BSKH, seg_kv_BS)), 0, (0,), shards > 1)
    if shards > 2:
        middle = range(1, shards - 1)
        state, _ = jax.lax.scan(
            lambda state, step: (ring_step(state, step, middle, True), None),
            state, jnp.arange(1, shards - 1, dtype=jnp.int32),
        )
    if shards > 1:
        state = ring_step(state, shards - 1, (shards - 1,), False)
    outs = []
    for _, l_BKGC, acc_BKGCH in state[0]:
        out_BKGCH = acc_BKGCH / jnp.where(l_BKGC == 0, 1.0, l_BKGC)[..., None]
        outs.append(jnp.transpose(out_BKGCH, (0, 3, 1, 2, 4)).reshape(B, C, N, H))
    return jnp.concatenate(outs, axis=1).astype(q_BTNH.dtype)


# --------------------------------------------------------------------------------------------
# Over the mesh.


def context_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array | None,
    *, mode: str = "ring", balanced: bool = False, implementation: str = "xla",
) -> jax.Array:
    """Causal (document-masked with segment ids) attention over a length-sharded sequence.

    Args:
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT: as for `jaxscale.models.decoder.attention`, in
        the sequence layout the model runs in (`balanced_order` when `balanced`).
      mode: "ring" (keys and values passed round the sequence axis) or "allgather" (keys and
        values gathered whole on every device); see the module docstring.
      balanced: the sequence is in `balanced_order` for the sequence axis' size (ring only).
      implementation: the attention implementation where no ring runs ("allgather", or no
        sequence axis); the ring computes its own float32 online softmax.

    Returns:
      [B, T, N, H] in q's dtype, in the same layout as q. Outside `activation_sharding`, or where
      "length" maps to no mesh axis larger than 1, this is `attention(...)` itself.

    Raises:
      ValueError: an unknown mode, or "allgather" with `balanced`.
      ShardingError: "length" maps to several mesh axes, the query and key/value heads are
        split differently, or a dimension is not divisible by its mesh axes (ring).
    """
    from jaxscale.models.decoder import attention

    if mode not in MODES:
        raise ValueError(f"context_attention: mode={mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "allgather" and balanced:
        raise ValueError(
            "context_attention: mode='allgather' attends in the natural sequence order; "
            "pass balanced=False"
        )
    context = current_context()
    if context is None:
        return attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation)
    mesh, rules = context
    q_axes = spec_axes(QUERIES, rules, mesh)
    length_axes = q_axes[1]
    if not length_axes:
        return attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation)
    if mode == "allgather":
        return _allgather_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation)
    if len(length_axes) > 1:
        raise ShardingError(
            f"ring attention passes keys round one mesh axis but 'length' maps to {length_axes}"
        )
    kv_axes = spec_axes(KEYS, rules, mesh)
    q_spec = partition_spec(q_axes)
    if kv_axes != q_axes:
        kv_spec = partition_spec(kv_axes)
        raise ShardingError(
            f"ring attention needs keys and values split like the queries, but queries "
            f"{QUERIES} are split as {q_spec} and keys {KEYS} as {kv_spec}"
        )
    (axis,) = length_axes
    shards = mesh.shape[axis]
    T = q_BTNH.shape[1]
    parts = _chunks_per_device(balanced) * shards
    if T % parts:
        raise ShardingError(
            f"ring attention over mesh axis {axis!r} of size {shards} needs the length ({T}) "
            f"divisible by {parts}" + (" (balanced layout)" if balanced else "")
        )
    named_sharding(mesh, QUERIES, rules, q_BTNH.shape, what="ring attention queries")
    named_sharding(mesh, KEYS, rules, k_BSKH.shape, what="ring attention keys")
    seg_spec = partition_spec(q_axes[:2])

    def local(q, k, v, *segments):
        seg = segments[0] if segments else None
        return ring_attention_local(q, k, v, seg, seg, axis_name=axis, shards=shards,
                                    balanced=balanced)

    args: tuple = (q_BTNH, k_BSKH, v_BSKH)
    specs: tuple = (q_spec, q_spec, q_spec)
    if segment_ids_BT is not None:
        args, specs = args + (segment_ids_BT,), specs + (seg_spec,)
    ring: Callable = shard_map(local, mesh, in_specs=specs, out_specs=q_spec)
    return ring(*args)


def _allgather_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation):
    """Keys and values whole along the length; queries and segment ids stay split (the
    partitioner gathers the segment ids the mask needs)."""
    from jaxscale.models.decoder import attention

    gathered = tuple(None if name == "length" else name for name in KEYS)
    q_BTNH = constrain(q_BTNH, QUERIES)
    k_BSKH = constrain(k_BSKH, gathered)
    v_BSKH = constrain(v_BSKH, gathered)
    if segment_ids_BT is not None:
        segment_ids_BT = constrain(segment_ids_BT, SEGMENTS)
    out_BTNH = attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation)
    return constrain(out_BTNH, QUERIES)
