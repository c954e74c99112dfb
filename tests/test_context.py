"""jaxscale.core.context: ring and all-gather attention over a length-sharded sequence against
the reference attention (outputs and gradients), the balanced layout, the blocks each device
computes, the collectives in the compiled HLO, activation memory, and every error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.analysis.hlo import collectives
from jaxscale.config import MeshConfig
from jaxscale.core import context as ctx
from jaxscale.core.mesh import make_mesh
from jaxscale.core.sharding import activation_sharding, named_sharding, resolve_rules
from jaxscale.errors import ShardingError
from jaxscale.models.decoder import attention, reference_attention

B, T, N, H = 2, 32, 4, 8
QUERIES = ("batch", "length", "act_heads", "act_head_dim")
KEYS = ("batch", "length", "act_kv_heads", "act_head_dim")
SEGMENTS = ("batch", "length")


def _inputs(batch: int, seq_len: int, kv_heads: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random q, k, v, an output cotangent and packed segment ids (non-decreasing per row)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    return {
        "q": normal(batch, seq_len, N, H),
        "k": normal(batch, seq_len, kv_heads, H),
        "v": normal(batch, seq_len, kv_heads, H),
        "cot": normal(batch, seq_len, N, H),
        "seg": np.sort(rng.integers(0, 4, (batch, seq_len)), axis=1).astype(np.int32),
    }


@jax.jit
def _reference(q, k, v, seg, cot):
    """Reference output and gradients wrt (q, k, v) of sum(out * cot), natural order."""
    mask = None if seg is None else seg[:, :, None] == seg[:, None, :]
    out, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
    return out, vjp(cot)


def _sharded(mesh, rules, x, names):
    return jax.device_put(x, named_sharding(mesh, names, rules, x.shape))


def _attend_fn(mesh, rules, **kwargs):
    """jit of (q, k, v, seg, cot) -> (out, (dq, dk, dv)) of context attention on `mesh`."""
    def run(q, k, v, seg, cot):
        with activation_sharding(mesh, rules):
            out, vjp = jax.vjp(lambda q, k, v: ctx.context_attention(q, k, v, seg, **kwargs),
                               q, k, v)
            return out, vjp(cot)
    return jax.jit(run)


def _args(mesh, rules, x, order, segments: bool):
    """The inputs in layout `order`, sharded by the rules (segment ids None without)."""
    take = lambda a: a[:, order]  # noqa: E731
    return (
        _sharded(mesh, rules, take(x["q"]), QUERIES),
        _sharded(mesh, rules, take(x["k"]), KEYS),
        _sharded(mesh, rules, take(x["v"]), KEYS),
        _sharded(mesh, rules, take(x["seg"]), SEGMENTS) if segments else None,
        _sharded(mesh, rules, take(x["cot"]), QUERIES),
    )


def _assert_close(actual, expected, tol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    rel = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert rel < tol, f"relative error {rel:.2e}"


def _check_against_reference(mesh, rules, x, *, balanced, segments, mode="ring"):
    shards = mesh.shape["sequence"]
    order = ctx.balanced_order(T, shards) if balanced else np.arange(T)
    out, grads = _attend_fn(mesh, rules, mode=mode, balanced=balanced)(
        *_args(mesh, rules, x, order, segments))
    ref_out, ref_grads = _reference(x["q"], x["k"], x["v"], x["seg"] if segments else None,
                                    x["cot"])
    _assert_close(out, ref_out[:, order])
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_close(got, want[:, order])


def _mesh(**sizes):
    mesh = make_mesh(MeshConfig(**sizes))
    return mesh, resolve_rules("auto", mesh)


# --------------------------------------------------------------------------------------------
# Layout and work.


def test_balanced_order_layout():
    order = ctx.balanced_order(8, 2)
    # chunks of 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 6, 7, 2, 3, 4, 5])
    assert order.dtype == np.int32
    x = np.arange(3 * 8).reshape(3, 8)
    np.testing.assert_array_equal(x[:, order][:, ctx.inverse_order(8, 2)], x)
    np.testing.assert_array_equal(ctx.balanced_order(6, 1), np.arange(6))


def test_balanced_order_rejects_indivisible_length():
    with pytest.raises(ValueError, match=re.escape(
            "balanced_order: seq_len=30 is not divisible by 2 * shards = 8")):
        ctx.balanced_order(30, 4)


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_unmasked_blocks_balanced_equal_unbalanced_not(shards):
    assert ctx.unmasked_blocks(shards, balanced=True) == [2 * shards + 1] * shards
    unbalanced = ctx.unmasked_blocks(shards, balanced=False)
    assert unbalanced == list(range(1, shards + 1))
    assert len(set(unbalanced)) == shards


# --------------------------------------------------------------------------------------------
# Against the reference.


@pytest.mark.parametrize("shards", [2, 4, 8])
@pytest.mark.parametrize("balanced", [False, True], ids=["contiguous", "balanced"])
def test_ring_matches_reference(shards, balanced):
    mesh, rules = _mesh(sequence=shards, data=8 // shards)
    batch = max(B, 8 // shards)
    x = _inputs(batch, T, kv_heads=2, seed=shards)
    for segments in (False, True):
        _check_against_reference(mesh, rules, x, balanced=balanced, segments=segments)


def test_ring_matches_reference_without_grouping():
    """One key/value head per query head (no grouping) and one head shared by all."""
    mesh, rules = _mesh(sequence=2, data=4)
    for kv_heads in (N, 1):
        x = _inputs(4, T, kv_heads=kv_heads, seed=kv_heads)
        _check_against_reference(mesh, rules, x, balanced=True, segments=True)


def test_ring_with_heads_over_tensor_axis():
    mesh, rules = _mesh(data=2, sequence=2, tensor=2)
    spec = named_sharding(mesh, QUERIES, rules, (B, T, N, H)).spec
    assert spec[2] is not None and spec[1] is not None  # heads and length both split
    x = _inputs(B, T, kv_heads=2, seed=7)
    _check_against_reference(mesh, rules, x, balanced=True, segments=True)


def test_allgather_matches_reference():
    mesh, rules = _mesh(sequence=4, data=2)
    x = _inputs(B, T, kv_heads=2, seed=3)
    for segments in (False, True):
        _check_against_reference(mesh, rules, x, balanced=False, segments=segments,
                                 mode="allgather")


def test_without_sequence_axis_is_attention():
    x = _inputs(B, T, kv_heads=2)
    q, k, v, seg = (jnp.asarray(x[n]) for n in ("q", "k", "v", "seg"))
    expected = attention(q, k, v, seg, "xla")
    # no activation context
    _assert_close(ctx.context_attention(q, k, v, seg, mode="ring"), expected)
    # a mesh whose length is not split: no ring runs
    mesh, rules = _mesh(data=8)

    def run(q, k, v, seg):
        with activation_sharding(mesh, rules):
            return ctx.context_attention(q, k, v, seg, mode="ring", balanced=True)

    _assert_close(jax.jit(run)(q, k, v, seg), expected)
    text = jax.jit(run).lower(q, k, v, seg).compile().as_text()
    assert "collective-permute" not in text


# --------------------------------------------------------------------------------------------
# Compiled collectives and memory.


def _compiled_text(mesh, rules, x, **kwargs):
    args = _args(mesh, rules, x, np.arange(T), segments=True)
    return _attend_fn(mesh, rules, **kwargs).lower(*args).compile().as_text()


def test_ring_hlo_permutes_and_gathers_nothing():
    mesh, rules = _mesh(sequence=4, data=2)
    x = _inputs(B, T, kv_heads=2)
    found = collectives(_compiled_text(mesh, rules, x, mode="ring", balanced=True), 8)
    kinds = {c.kind for c in found}
    assert "collective-permute" in kinds
    assert "all-gather" not in kinds
    # a device's keys (or values): its batch share, T/4 positions, both heads
    kv_bytes = (B // 2) * (T // 4) * 2 * H * 4
    assert kv_bytes in {c.bytes for c in found if c.kind == "collective-permute"}
    # shard_map's transpose may leave an all-reduce over single-device groups (a no-op)
    assert all(c.group_size == 1 for c in found if c.kind == "all-reduce")


def test_allgather_hlo_gathers_keys():
    mesh, rules = _mesh(sequence=4, data=2)
    x = _inputs(B, T, kv_heads=2)
    found = collectives(_compiled_text(mesh, rules, x, mode="allgather", balanced=False), 8)
    gathered = [c for c in found if c.kind == "all-gather"]
    assert gathered and {c.group_size for c in gathered} == {4}
    # keys and values whole along the length on each device
    assert (B // 2) * T * 2 * H * 4 in {c.bytes for c in gathered}
    assert "collective-permute" not in {c.kind for c in found}


def _temp_bytes(mesh, rules, batch, fn) -> int:
    kv_heads = 2
    shapes = {"q": ((batch, 1024, N, H), QUERIES), "k": ((batch, 1024, kv_heads, H), KEYS),
              "v": ((batch, 1024, kv_heads, H), KEYS)}
    args = [jax.ShapeDtypeStruct(shape, jnp.float32,
                                 sharding=named_sharding(mesh, names, rules, shape))
            for shape, names in shapes.values()]

    def loss(q, k, v):
        with activation_sharding(mesh, rules):
            return jnp.sum(fn(q, k, v))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_activation_memory_is_blocks_not_rows():
    """At T=1024, the ring's forward and backward over 8 sequence shards need far less scratch
    per device than the reference over 8 data shards (one whole sequence per device)."""
    ring_mesh, ring_rules = _mesh(sequence=8)
    ring = _temp_bytes(ring_mesh, ring_rules, 1, lambda q, k, v: ctx.context_attention(
        q, k, v, None, mode="ring", balanced=True))
    data_mesh, data_rules = _mesh(data=8)
    reference = _temp_bytes(data_mesh, data_rules, 8,
                            lambda q, k, v: attention(q, k, v, None, "reference"))
    assert reference >= 4 * ring, (ring, reference)


# --------------------------------------------------------------------------------------------
# Errors.


def test_allgather_rejects_balanced_layout():
    x = _inputs(B, T, kv_heads=2)
    with pytest.raises(ValueError, match=re.escape(
            "context_attention: mode='allgather' attends in the natural sequence order; "
            "pass balanced=False")):
        ctx.context_attention(x["q"], x["k"], x["v"], None, mode="allgather", balanced=True)


def test_unknown_mode():
    x = _inputs(B, T, kv_heads=2)
    with pytest.raises(ValueError, match=re.escape(
            "context_attention: mode='ulysses'; choose one of: ring, allgather")):
        ctx.context_attention(x["q"], x["k"], x["v"], None, mode="ulysses")


def test_ring_rejects_length_over_two_axes():
    mesh, rules = _mesh(data=2, sequence=2, tensor=2)
    rules = (("length", ("sequence", "tensor")),) + rules
    x = _inputs(B, T, kv_heads=2)
    with activation_sharding(mesh, rules), pytest.raises(ShardingError, match=re.escape(
            "ring attention passes keys round one mesh axis but 'length' maps to "
            "('sequence', 'tensor')")):
        ctx.context_attention(x["q"], x["k"], x["v"], None, mode="ring")


def test_ring_rejects_kv_heads_split_unlike_query_heads():
    mesh, rules = _mesh(data=2, sequence=2, tensor=2)
    rules = (("act_kv_heads", None),) + rules
    x = _inputs(B, T, kv_heads=2)
    with activation_sharding(mesh, rules), pytest.raises(ShardingError, match=re.escape(
            "ring attention needs keys and values split like the queries, but queries "
            "('batch', 'length', 'act_heads', 'act_head_dim') are split as "
            "P('data', 'sequence', 'tensor', None) and keys ('batch', 'length', 'act_kv_heads', "
            "'act_head_dim') as P('data', 'sequence', None, None)")):
        ctx.context_attention(x["q"], x["k"], x["v"], None, mode="ring")


def test_ring_rejects_length_the_layout_cannot_split():
    mesh, rules = _mesh(sequence=4, data=2)
    x = _inputs(B, 36, kv_heads=2)
    with activation_sharding(mesh, rules), pytest.raises(ShardingError, match=re.escape(
            "ring attention over mesh axis 'sequence' of size 4 needs the length (36) divisible "
            "by 8 (balanced layout)")):
        ctx.context_attention(x["q"], x["k"], x["v"], None, mode="ring", balanced=True)
