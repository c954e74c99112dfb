"""jaxscale.models: both decoder styles, scanned vs unrolled layers, bf16 compute, attention
implementations, document masking and dropout."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import assert_trees_close, random_batch, tiny_model_config

from jaxscale.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from jaxscale.core import optim
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.state import num_params
from jaxscale.core.step import jit_step
from jaxscale.core.trees import path_str
from jaxscale.models import MODELS, build_model, register
from jaxscale.models.decoder import attention
from jaxscale.run.build import init_state, make_train_step

SEQ = 16
STYLES = {
    # rmsnorm, rope, swiglu, grouped-query attention, untied output projection
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", num_kv_heads=2,
                  attention="xla"),
    # layernorm, learned positions, gelu, multi-head attention, tied embeddings, biases
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", num_kv_heads=0,
                 tie_embeddings=True, use_bias=True, attention="xla"),
}


def style(name: str, **overrides) -> ModelConfig:
    return tiny_model_config(**{**STYLES[name], **overrides})


@functools.cache
def shapes_of(cfg: ModelConfig):
    """Unboxed abstract parameters (shapes and dtypes) of `cfg`'s model, nothing computed."""
    tokens_BT = jnp.zeros((1, SEQ), jnp.int32)
    return nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens_BT)["params"])


@functools.cache
def params_of(cfg: ModelConfig):
    """Random parameters of `cfg`'s model, drawn on the host (no init compile): weights and
    biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2), so every parameter affects the logits."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        noise = rng.normal(0.0, 0.1, x.shape).astype(x.dtype)
        return noise + 1 if path_str(path).endswith("scale") else noise

    return jax.tree_util.tree_map_with_path(draw, shapes_of(cfg))


@functools.cache
def forward(cfg: ModelConfig, deterministic: bool = True):
    """jit(params, tokens, positions, segment_ids, rng) -> logits for `cfg`'s model."""
    model = build_model(cfg)

    @jax.jit
    def fn(params, tokens, positions=None, segment_ids=None, rng=None):
        rngs = {} if rng is None else {"dropout": rng}
        return model.apply({"params": params}, tokens, positions, segment_ids,
                           deterministic=deterministic, rngs=rngs)

    return fn


def tokens(batch=2, seq=SEQ, seed=0):
    return jnp.asarray(random_batch(batch, seq, seed=seed)["inputs"])


# --------------------------------------------------------------------------------------------
# Structure of the two styles.


def test_llama_style_parameters():
    cfg = style("llama")
    params = shapes_of(cfg)
    L, D, N, K, F, V = 2, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.d_ff, cfg.vocab_size
    H = D // N
    assert set(params) == {"embed", "layers", "final_norm", "lm_head"}
    assert params["layers"]["attn"]["key"]["kernel"].shape == (L, D, K, H)
    assert set(params["layers"]["mlp"]) == {"wi_gate", "wi_up", "wo"}
    assert set(params["final_norm"]) == {"scale"}  # rmsnorm: no bias
    expected = V * D + L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D) + D + D * V
    assert num_params(params) == expected


def test_gpt2_style_parameters():
    cfg = style("gpt2")
    params = shapes_of(cfg)
    L, D, N, F, V, P = 2, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    H = D // N
    assert set(params) == {"embed", "pos_embed", "layers", "final_norm"}  # tied: no lm_head
    assert set(params["layers"]["mlp"]) == {"wi_up", "wo"}
    assert set(params["final_norm"]) == {"scale", "bias"}
    per_layer = (
        3 * (D * N * H + N * H)  # query, key, value kernels and biases
        + N * H * D + D  # out
        + D * F + F + F * D + D  # wi_up, wo
        + 2 * 2 * D  # two layernorms
    )
    assert num_params(params) == V * D + P * D + L * per_layer + 2 * D


def test_tied_embeddings_are_the_output_projection():
    """Logits of the GPT-2 style are the final hidden state times the embedding table^T."""
    cfg = style("gpt2", num_layers=1)
    params = params_of(cfg)
    t = tokens()
    logits = forward(cfg)(params, t)
    model = build_model(cfg)

    def final_hidden(params):
        _, captured = model.apply({"params": params}, t, capture_intermediates=True,
                                  mutable=["intermediates"])
        return captured["intermediates"]["final_norm"]["__call__"][0]

    hidden = jax.jit(final_hidden)(params)
    expected = jnp.einsum("btd,vd->btv", hidden, params["embed"]["embedding"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Scanned vs unrolled layers.


def unstack_layers(params, num_layers):
    """Scanned params ('layers' with a leading layer axis) -> layers_0, layers_1, ..."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


@pytest.mark.parametrize("name", STYLES)
def test_scanned_and_unrolled_layers_agree(name):
    scanned, unrolled = style(name), style(name, scan_layers=False)
    params = params_of(scanned)
    flat = unstack_layers(params, scanned.num_layers)
    # Same structure as the unrolled model's own parameters.
    assert jax.tree_util.tree_structure(flat) == jax.tree_util.tree_structure(shapes_of(unrolled))
    t = tokens()
    a = forward(scanned)(params, t)
    b = forward(unrolled)(flat, t)
    assert a.shape == (2, SEQ, scanned.vocab_size)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("model, unroll", [("decoder", 2), ("decoder", 3), ("decoder_nnx", 2)])
def test_scan_unroll_keeps_the_parameters_logits_and_gradients(model, unroll):
    """model.scan_unroll runs `unroll` layers per loop iteration (2 of 3: a remainder step; 3:
    the whole stack in one iteration): the same stacked parameters, the same logits and
    gradients as one layer per iteration."""
    from jaxscale.models import adapt

    base = dataclasses.replace(style("llama", num_layers=3, remat="full"), name=model)
    batch = {"inputs": tokens()}
    adapters = [adapt(build_model(base)),
                adapt(build_model(dataclasses.replace(base, scan_unroll=unroll)))]
    boxed, _ = jax.eval_shape(adapters[0].init, jax.random.key(0), {"inputs": tokens()})
    assert jax.eval_shape(adapters[1].init, jax.random.key(0), {"inputs": tokens()})[0] == boxed
    params = jax.jit(adapters[0].init)(jax.random.key(0), {"inputs": tokens()})[0]

    def value_and_grad(adapter):
        def loss(p):
            logits = adapter.apply(p, {}, batch, rng=None, train=False).outputs
            return jnp.mean(logits.astype(jnp.float32) ** 2), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(nn.unbox(params))

    (_, ref), ref_grads = value_and_grad(adapters[0])
    (_, out), grads = value_and_grad(adapters[1])
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert_trees_close(grads, ref_grads, rtol=1e-6, atol=1e-8)



@pytest.mark.parametrize("x_shape, w_shape, contract", [
    ((4, 8), (8, 3), ((1,), (0,))),  # a plain dense layer
    ((2, 5, 8), (8, 4, 6), ((2,), (0,))),  # query/key/value: [D] -> [heads, head_dim]
    ((2, 5, 4, 6), (4, 6, 8), ((2, 3), (0, 1))),  # the attention output: [heads, head_dim] -> [D]
    ((2, 6, 5, 4), (4, 6, 8), ((3, 1), (0, 1))),  # contracted axes out of order
])
def test_weight_gradient_matmul_equals_autodiff(x_shape, w_shape, contract):
    """In float32 the custom VJP of `weight_grad_dot` is autodiff's, for every layout the dense
    layers use; in bf16 the weight's gradient matmul takes bf16 operands with a float32 result."""
    from jaxscale.core.dtypes import _dot

    rng = np.random.default_rng(0)
    dims = (contract, ((), ()))
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, w_shape))
    g = jnp.asarray(rng.normal(size=jax.lax.dot_general(x, w, dims).shape), jnp.float32)
    ref = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), x, w)[1](g)
    got = jax.vjp(lambda a, b: _dot(a, b, dims, None, jnp.float32), x, w)[1](g)
    assert_trees_close(got, ref, rtol=1e-6, atol=1e-6)
    jaxpr = jax.make_jaxpr(jax.vjp(lambda b: _dot(x.astype(jnp.bfloat16), b, dims, None,
                                                  jnp.float32), w.astype(jnp.bfloat16))[1])(
        g.astype(jnp.bfloat16))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [v.aval.dtype for e in dots for v in e.invars] == [jnp.bfloat16] * 4
    # the input's gradient in bf16, the weight's in float32
    assert sorted(str(e.outvars[0].aval.dtype) for e in dots) == ["bfloat16", "float32"]


def test_float32_weight_gradients_change_only_the_gradients_rounding():
    """model.weight_grad_dtype=float32 on a bf16 model: the same logits bit for bit, gradients
    within bf16 rounding of the compute-dtype ones; on a float32 model the plain matmul forward
    and the weight's gradient formed in the weight's own axis order."""
    from jaxscale.core.dtypes import weight_grad_dot

    # In the compute dtype (a float32 model; "compute") the forward pass is the plain matmul bit
    # for bit, and the weight's gradient is one dot of the layer's input and the cotangent,
    # already in the weight's [in, out] order: the input first, no transpose after it.
    x, w = jnp.arange(24.0).reshape(2, 3, 4) / 24, jnp.arange(20.0).reshape(4, 5) / 20
    dims = (((2,), (0,)), ((), ()))
    for grad_dtype, compute in (("float32", "float32"), ("compute", "float32")):
        dot = weight_grad_dot(grad_dtype, compute)
        np.testing.assert_array_equal(dot(x, w, dims), jax.lax.dot_general(x, w, dims))
        jaxpr = jax.make_jaxpr(jax.vjp(lambda b, dot=dot: dot(x, b, dims), w)[1])(
            jnp.ones((2, 3, 5)))
        (weight,) = [e for e in jaxpr.eqns
                     if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (4, 5)]
        assert [v.aval.shape for v in weight.invars] == [(2, 3, 4), (2, 3, 5)]
        assert not [e for e in jaxpr.eqns
                    if e.primitive.name == "transpose" and weight.outvars[0] in e.invars]
    base = style("llama", dtype="bfloat16")
    mixed = dataclasses.replace(base, weight_grad_dtype="float32")
    params = params_of(base)

    def value_and_grad(cfg):
        def loss(p):
            logits = forward(cfg)(p, tokens())
            return jnp.mean(logits.astype(jnp.float32) ** 2), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref), ref_grads = value_and_grad(base)
    (_, out), grads = value_and_grad(mixed)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    assert_trees_close(grads, ref_grads, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------------------------
# bf16 compute, float32 parameters.


@pytest.mark.parametrize("name", STYLES)
def test_bf16_compute_trains_with_float32_params(name):
    cfg = style(name, dtype="bfloat16", param_dtype="float32")
    model = build_model(cfg)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    rules = shd.resolve_rules("fsdp")
    tx = optim.make_optimizer(
        OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0), total_steps=100
    )
    state, shardings = init_state(model, tx, mesh, rules, seq_len=SEQ)
    step = jit_step(make_train_step(model, tx, mesh=mesh, rules=rules), shardings,
                    shd.batch_sharding(mesh, rules))
    batch = random_batch(8, SEQ, seed=1)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert all(bool(np.isfinite(x)) for x in losses)
    np.testing.assert_allclose(losses[0], np.log(cfg.vocab_size), atol=0.05)
    assert losses[-1] < losses[0] - 0.5, losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state.params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    moments = jax.tree_util.tree_leaves(state.opt_state[1][0].mu)
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    # The activations really are bf16: the model's logits come out in bf16.
    logits = jax.eval_shape(
        lambda p: model.apply({"params": p}, batch["inputs"]), state.params
    )
    assert logits.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# Attention implementations and document masking.


def _segments(batch: int):
    """Two packed documents per row: 6 tokens of document 1, then 10 of document 2."""
    segment_ids = jnp.asarray(np.repeat([[1] * 6 + [2] * 10], batch, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(6)) + list(range(10))], batch, axis=0),
                            jnp.int32)
    return positions, segment_ids


def test_attention_function_xla_matches_reference():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, SEQ, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, SEQ, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, SEQ, 2, 8)), jnp.float32)
    _, segment_ids = _segments(2)
    for seg in (None, segment_ids):
        ref = attention(q, k, v, seg, "reference")
        for impl in ("xla", "auto"):
            np.testing.assert_allclose(attention(q, k, v, seg, impl), ref, rtol=1e-5, atol=1e-6)
    # Causal: the first query sees only the first key, so it returns the first value exactly
    # (query head 3 belongs to kv head 1 under grouped-query attention).
    out = attention(q, k, v, None, "reference")
    np.testing.assert_allclose(out[:, 0, 3], v[:, 0, 1], rtol=1e-6)


@pytest.mark.parametrize("with_segments", [False, True])
def test_model_xla_and_reference_attention_agree(with_segments):
    xla, ref = style("llama"), style("llama", attention="reference")
    params = params_of(xla)
    t = tokens()
    positions, segment_ids = _segments(2) if with_segments else (None, None)
    a = forward(xla)(params, t, positions, segment_ids)
    b = forward(ref)(params, t, positions, segment_ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", STYLES)
def test_documents_do_not_attend_to_each_other(name):
    cfg = style(name)
    params = params_of(cfg)
    positions, segment_ids = _segments(2)
    t = tokens()
    logits = forward(cfg)(params, t, positions, segment_ids)
    # Change every token of document 1: document 2's logits do not move.
    changed = t.at[:, :6].set((t[:, :6] + 7) % cfg.vocab_size)
    logits_changed = forward(cfg)(params, changed, positions, segment_ids)
    np.testing.assert_allclose(logits_changed[:, 6:], logits[:, 6:], rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(logits_changed[:, :6] - logits[:, :6])) > 1e-3
    # ... and equal document 2's logits when it is run on its own.
    alone = forward(cfg)(params, t[:, 6:])
    np.testing.assert_allclose(logits[:, 6:], alone, rtol=1e-5, atol=1e-6)
    # Without segment ids, document 2 does see document 1.
    unmasked = forward(cfg)(params, t, positions)
    assert np.max(np.abs(unmasked[:, 6:] - logits[:, 6:])) > 1e-3


# --------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_uses_the_explicit_rng():
    cfg = style("llama", dropout=0.3)
    params = params_of(style("llama"))  # dropout adds no parameters
    t = tokens()
    key_a, key_b = jax.random.key(1), jax.random.key(2)
    eval_fn, train_fn = forward(cfg, True), forward(cfg, False)
    # deterministic=True: no dropout, whatever the rng.
    a = eval_fn(params, t, rng=key_a)
    np.testing.assert_array_equal(a, eval_fn(params, t, rng=key_b))
    np.testing.assert_array_equal(a, forward(style("llama"))(params, t))
    # deterministic=False: the same rng gives the same logits, another rng others.
    b = train_fn(params, t, rng=key_a)
    np.testing.assert_array_equal(b, train_fn(params, t, rng=key_a))
    c = train_fn(params, t, rng=key_b)
    assert np.max(np.abs(b - c)) > 1e-3
    assert np.max(np.abs(b - a)) > 1e-3


# --------------------------------------------------------------------------------------------
# Registry.


def test_registry():
    assert isinstance(build_model(style("llama")), MODELS["decoder"])
    with pytest.raises(ConfigError, match=r"^model.name='gpt' is not a registered model; "
                       r"choose one of: decoder, decoder_nnx, resnet, vit, vgg, googlenet, "
                       r"densenet, efficientnet, regnet \(or register one"):
        build_model(tiny_model_config(name="gpt"))
    register("test_tiny", lambda cfg: MODELS["decoder"](cfg))
    try:
        assert build_model(tiny_model_config(name="test_tiny")).cfg.name == "test_tiny"
    finally:
        del MODELS["test_tiny"]
