"""jaxscale.models.nnx and decoder_nnx: the NNX adapter on a user-written LM, BatchNorm, dropout
and sown auxiliary losses; the NNX twin of the decoder against the Linen decoder from the same
parameters (scanned and unrolled layers, grouped-query and multi-head attention)."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from util import random_batch, tiny_model_config

from jaxscale.core.trees import path_str
from jaxscale.models import adapt
from jaxscale.models.decoder import Decoder
from jaxscale.models.decoder_nnx import DecoderNnx, params_from_linen
from jaxscale.models.nnx import AuxLoss, Metric, NnxAdapter, is_nnx, nnx_factory

B, T, V, D, F = 4, 16, 64, 32, 64
_List = getattr(nnx, "List", list)


def no_eager_sharding():
    """Build modules with logical names outside a mesh (flax >= 0.12 shards them on creation)."""
    use = getattr(nnx, "use_eager_sharding", None)
    return use(False) if use is not None else contextlib.nullcontext()


def tokens_BT(seed: int = 0) -> jax.Array:
    return jnp.asarray(random_batch(B, T, V, seed=seed)["inputs"])


def names_by_path(boxed) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {path_str(p): tuple(x.names) if isinstance(x, nn.Partitioned) else None
            for p, x in flat}


# --------------------------------------------------------------------------------------------
# A user-written NNX LM: embedding, 2 blocks of single-head causal attention + MLP, head.


def _named(names):
    return nnx.with_partitioning(nnx.initializers.normal(0.02), names)


class UserBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(D, 3 * D, use_bias=False, rngs=rngs,
                              kernel_init=_named(("embed", "heads")))
        self.up = nnx.Linear(D, F, rngs=rngs, kernel_init=_named(("embed", "mlp")),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)))
        self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs,
                               kernel_init=_named(("mlp", "embed")))

    def __call__(self, x_BTD):
        q_BTD, k_BTD, v_BTD = jnp.split(self.qkv(x_BTD), 3, axis=-1)
        scores_BTS = jnp.einsum("btd,bsd->bts", q_BTD, k_BTD) / np.sqrt(D)
        causal_TS = jnp.tril(jnp.ones((x_BTD.shape[1],) * 2, bool))
        probs_BTS = jax.nn.softmax(jnp.where(causal_TS, scores_BTS, -1e9), axis=-1)
        x_BTD = x_BTD + jnp.einsum("bts,bsd->btd", probs_BTS, v_BTD)
        return x_BTD + self.down(nnx.gelu(self.up(x_BTD)))


class UserLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs, embedding_init=_named(("vocab", "embed")))
        self.blocks = _List([UserBlock(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs,
                               kernel_init=_named(("embed", "vocab")))

    def __call__(self, input_ids_BT):
        x_BTD = self.embed(input_ids_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(x_BTD)


USER_NAMES = {
    "embed/embedding": ("vocab", "embed"),
    **{f"blocks/{i}/{k}": v for i in range(2) for k, v in {
        "qkv/kernel": ("embed", "heads"), "up/kernel": ("embed", "mlp"), "up/bias": ("mlp",),
        "down/kernel": ("mlp", "embed")}.items()},
    "head/kernel": ("embed", "vocab"),
}


class Unnamed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)

    def __call__(self, tokens):
        return self.embed(tokens)


@pytest.mark.parametrize("obj, expected", [
    (UserLM, True),  # an nnx.Module subclass
    (lambda rngs: UserLM(rngs), True),  # a function with an `rngs` parameter
    (nnx_factory(lambda r: UserLM(r)), True),  # a marked factory
    (Decoder(tiny_model_config()), False),  # a Linen module
    (lambda key: None, False),
    (3, False),
])
def test_is_nnx_convention(obj, expected):
    assert is_nnx(obj) is expected
    if expected:
        assert isinstance(adapt(obj), NnxAdapter)


def test_user_lm_params_carry_their_names_and_apply_matches_the_module():
    with no_eager_sharding():
        module = UserLM(nnx.Rngs(3))
    tokens = tokens_BT()
    adapter = NnxAdapter(UserLM)
    assert adapter.kind == "nnx" and "nnx.with_partitioning" in adapter.hint

    params, extra = adapter.init(jax.random.key(0), {"inputs": tokens})
    assert extra == {}
    assert names_by_path(params) == USER_NAMES
    shapes = jax.tree_util.tree_map(jnp.shape, nn.unbox(params))
    assert shapes["blocks"]["1"]["qkv"]["kernel"] == (D, 3 * D)
    assert shapes["embed"]["embedding"] == (V, D)
    # Born from the (traced) key: jit gives the eager values, another key other values.
    jitted, _ = jax.jit(adapter.init)(jax.random.key(0), {"inputs": tokens})
    for a, b in zip(jax.tree_util.tree_leaves(nn.unbox(params)),
                    jax.tree_util.tree_leaves(nn.unbox(jitted)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    other, _ = adapter.init(jax.random.key(1), {"inputs": tokens})
    assert not np.allclose(nn.unbox(other)["head"]["kernel"], nn.unbox(params)["head"]["kernel"])

    # The module's own values, through an instance adapter, drive the factory's graph.
    own, own_extra = NnxAdapter(module).init(jax.random.key(0), {"inputs": tokens})
    out = jax.jit(lambda p: adapter.apply(p, own_extra, {"inputs": tokens}, rng=None,
                                          train=False))(nn.unbox(own))
    assert out.outputs.shape == (B, T, V)
    np.testing.assert_allclose(out.outputs, module(tokens), rtol=1e-6, atol=1e-7)
    assert out.extra == {} and out.aux_losses == {} and out.aux_metrics == {}


def test_a_model_without_names_gives_plain_arrays():
    params, _ = NnxAdapter(Unnamed).init(jax.random.key(0), {"inputs": tokens_BT()})
    assert names_by_path(params) == {"embed/embedding": None}
    assert params["embed"]["embedding"].shape == (V, D)


# --------------------------------------------------------------------------------------------
# The NNX twin of the decoder.


STYLES = {
    "llama_gqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", num_kv_heads=2),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", num_kv_heads=0,
                 tie_embeddings=True, use_bias=True),
    "llama_remat": dict(num_kv_heads=1, remat="full"),
}


def packed_inputs() -> dict:
    tokens = tokens_BT(seed=1)
    segment_ids = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], B, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(10)) + list(range(6))], B, axis=0), jnp.int32)
    return {"inputs": tokens, "positions": positions, "segment_ids": segment_ids}


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("style", list(STYLES))
def test_twin_logits_and_gradients_equal_the_linen_decoder(style, scan_layers):
    cfg = tiny_model_config(attention="xla", scan_layers=scan_layers, **STYLES[style])
    inputs = packed_inputs()
    linen = Decoder(cfg)
    boxed = jax.jit(linen.init)(jax.random.key(0), inputs["inputs"])["params"]
    linen_params = nn.unbox(boxed)
    twin = NnxAdapter(DecoderNnx.factory(cfg))
    assert twin.config is cfg

    twin_boxed, extra = jax.eval_shape(twin.init, jax.random.key(0), {"inputs": inputs["inputs"]})
    assert extra == {}  # dropout's RNG state is not stored
    params = params_from_linen(linen_params, cfg)
    assert (jax.tree_util.tree_structure(params)
            == jax.tree_util.tree_structure(nn.unbox(twin_boxed)))
    # The same logical names on the same parameters (unrolled Linen layers are layers_<i>).
    linen_names = {k.replace("layers_", "layers/"): v for k, v in names_by_path(boxed).items()}
    assert names_by_path(twin_boxed) == linen_names

    def linen_loss(p):
        logits = linen.apply({"params": p}, inputs["inputs"], inputs["positions"],
                             inputs["segment_ids"])
        return jnp.mean(logits ** 2), logits

    def twin_loss(p):
        logits = twin.apply(p, {}, inputs, rng=jax.random.key(5), train=True).outputs
        return jnp.mean(logits ** 2), logits

    (_, ref), ref_grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(linen_params)
    (_, out), grads = jax.jit(jax.value_and_grad(twin_loss, has_aux=True))(params)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    expected = params_from_linen(ref_grads, cfg)
    for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-8, err_msg=path_str(path))


@pytest.mark.parametrize("linen_scan, twin_scan, dtypes", [
    (True, False, {}),
    (False, True, {}),
    (True, True, dict(dtype="bfloat16", param_dtype="bfloat16")),  # to bf16 precision
])
def test_params_from_linen_converts_between_layer_layouts(linen_scan, twin_scan, dtypes):
    linen_cfg = tiny_model_config(attention="xla", scan_layers=linen_scan, **dtypes)
    twin_cfg = tiny_model_config(attention="xla", scan_layers=twin_scan, **dtypes)
    tokens = tokens_BT()
    linen_params = jax.jit(Decoder(linen_cfg).init)(jax.random.key(0), tokens)["params"]
    ref = jax.jit(Decoder(linen_cfg).apply)({"params": linen_params}, tokens)
    twin = NnxAdapter(DecoderNnx.factory(twin_cfg))
    out = jax.jit(lambda p: twin.apply(p, {}, {"inputs": tokens}, rng=None, train=False))(
        params_from_linen(linen_params, twin_cfg))
    assert out.outputs.dtype == ref.dtype
    tol = 1e-2 if dtypes else 1e-5
    np.testing.assert_allclose(np.asarray(out.outputs, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol / 10)


# --------------------------------------------------------------------------------------------
# Batch statistics, dropout and sown values.


class BatchNormNet(nnx.Module):
    """Linear -> BatchNorm -> Linear, no train switch: the adapter sets use_running_average."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, F, rngs=rngs, kernel_init=_named(("embed", "mlp")))
        self.norm = nnx.BatchNorm(F, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(F, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.up(x)))


class FlaggedBatchNormNet(BatchNormNet):
    """The same, taking the train switch."""

    def __call__(self, x, *, train: bool):
        return self.head(self.norm(self.up(x), use_running_average=not train))


@pytest.mark.parametrize("model", [BatchNormNet, FlaggedBatchNormNet])
def test_batch_stats_update_in_training_only(model):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, D)), jnp.float32)
    adapter = NnxAdapter(model)
    boxed, extra = adapter.init(jax.random.key(0), {"inputs": x})
    params = nn.unbox(boxed)
    assert set(extra) == {"norm"} and set(extra["norm"]) == {"mean", "var"}
    np.testing.assert_array_equal(extra["norm"]["var"], np.ones(F))

    h = x @ params["up"]["kernel"] + params["up"]["bias"]
    trained = jax.jit(lambda p, e: adapter.apply(p, e, {"inputs": x}, rng=jax.random.key(1),
                                                 train=True))(params, extra)
    np.testing.assert_allclose(trained.extra["norm"]["mean"], 0.1 * h.mean(0), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(trained.extra["norm"]["var"], 0.9 + 0.1 * h.var(0), rtol=1e-5)

    evaluated = adapter.apply(params, trained.extra, {"inputs": x}, rng=None, train=False)
    assert evaluated.extra is trained.extra
    stats = trained.extra["norm"]
    normed = ((h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["norm"]["scale"]
              + params["norm"]["bias"])
    np.testing.assert_allclose(
        evaluated.outputs, normed @ params["head"]["kernel"] + params["head"]["bias"],
        rtol=1e-5, atol=1e-6)


class DropoutNet(nnx.Module):
    """Linear -> Dropout(0.5), no train switch: the adapter sets Dropout.deterministic."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, F, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


class CallRngsDropoutNet(DropoutNet):
    """The same, its Dropout keyless: ``__call__`` takes the ``rngs`` the adapter passes."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, F, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs: nnx.Rngs):
        return self.drop(self.lin(x), rngs=rngs)


@pytest.mark.parametrize("model", [DropoutNet, CallRngsDropoutNet])
def test_dropout_draws_from_the_step_rng_in_training_and_is_off_in_eval(model):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, D)), jnp.float32)
    adapter = NnxAdapter(model)
    boxed, extra = adapter.init(jax.random.key(0), {"inputs": x})
    assert extra == {} and "drop" not in boxed  # no RNG state in the train state
    params = nn.unbox(boxed)
    dense = x @ params["lin"]["kernel"] + params["lin"]["bias"]
    apply = jax.jit(adapter.apply, static_argnames="train")

    def run(rng, train):
        return apply(params, extra, {"inputs": x}, rng=rng, train=train).outputs

    a, a2, b = run(jax.random.key(1), True), run(jax.random.key(1), True), run(jax.random.key(2),
                                                                              True)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)
    kept = np.asarray(a) != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(np.asarray(a)[kept], 2 * np.asarray(dense)[kept], rtol=1e-6)
    np.testing.assert_allclose(run(jax.random.key(1), False), dense, rtol=1e-6)
    np.testing.assert_allclose(run(None, False), dense, rtol=1e-6)


def test_twin_dropout_differs_by_rng_and_matches_no_dropout_in_eval():
    cfg = tiny_model_config(attention="xla", dropout=0.5)
    tokens = tokens_BT()
    adapter = NnxAdapter(DecoderNnx.factory(cfg))
    boxed, extra = jax.jit(adapter.init)(jax.random.key(0), {"inputs": tokens})
    params = nn.unbox(boxed)
    assert extra == {}

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def run(model, rng, train):
        return model.apply(params, {}, {"inputs": tokens}, rng=rng, train=train).outputs

    a, b = run(adapter, jax.random.key(1), True), run(adapter, jax.random.key(2), True)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(adapter, jax.random.key(1), True))
    no_dropout = NnxAdapter(DecoderNnx.factory(tiny_model_config(attention="xla")))
    np.testing.assert_allclose(run(adapter, jax.random.key(1), False),
                               run(no_dropout, None, False), rtol=1e-6)
    assert not np.allclose(a, run(no_dropout, None, False))


class SowingBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        x = self.lin(x)
        self.sow(AuxLoss, "balance", jnp.mean(x ** 2))
        self.sow(Metric, "absmax", jnp.max(jnp.abs(x)))
        return x


class SowingNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = _List([SowingBlock(rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_sown_aux_losses_and_metrics_reach_applied_and_not_extra():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, D)), jnp.float32)
    adapter = NnxAdapter(SowingNet)
    boxed, extra = adapter.init(jax.random.key(0), {"inputs": x})
    params = nn.unbox(boxed)
    out = jax.jit(lambda p: adapter.apply(p, extra, {"inputs": x}, rng=jax.random.key(0),
                                          train=True))(params)
    h1 = x @ params["blocks"]["0"]["lin"]["kernel"] + params["blocks"]["0"]["lin"]["bias"]
    h2 = h1 @ params["blocks"]["1"]["lin"]["kernel"] + params["blocks"]["1"]["lin"]["bias"]
    assert set(out.aux_losses) == {"blocks/balance"}
    np.testing.assert_allclose(out.aux_losses["blocks/balance"],
                               jnp.mean(h1 ** 2) + jnp.mean(h2 ** 2), rtol=1e-5)
    assert set(out.aux_metrics) == {"blocks/absmax"}
    np.testing.assert_allclose(out.aux_metrics["blocks/absmax"],
                               jnp.max(jnp.abs(h1)) + jnp.max(jnp.abs(h2)), rtol=1e-6)
    assert out.extra == {} and extra == {}
    np.testing.assert_allclose(out.outputs, h2, rtol=1e-5, atol=1e-6)
