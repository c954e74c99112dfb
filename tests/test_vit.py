"""The Vision Transformer: published parameter counts, forward MACs by hand and against XLA,
a tiny ViT trained on fsdp=4 x tensor=2 equal to one device, position interpolation and sincos
positions against numpy, the patch embeddings against numpy, bidirectional attention, stochastic
depth, and the one-line errors."""

from __future__ import annotations

import dataclasses
from typing import get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale import config as config_lib
from jaxscale import vision_config
from jaxscale.core.mesh import make_mesh
from jaxscale.models import MODELS, build_model
from jaxscale.models import vit as vit_lib
from jaxscale.models.vit import PATCH_EMBEDS, POOLS, POSITIONS, ViT, forward_macs
from jaxscale.run.build import build
from jaxscale.vision_config import ViTConfig

TINY = ["model.name=vit", "model.size=Ti", "model.d_model=32", "model.num_heads=4",
        "model.num_layers=2", "model.d_ff=64", "model.patch_size=4", "model.image_size=16",
        "model.num_classes=4", "task.name=classify", "task.num_classes=4",
        "task.input_shape=[16,16,1]", "data.source=synthetic", "batch_size=16",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=0",
        "optim.clip_norm=0", "optim.warmup_steps=0", "optim.schedule=constant", "progress=false"]


def _small(**overrides) -> ViTConfig:
    """Width 32, 2 blocks of 4 heads, 4x4 patches of 16x16 images, 4 classes."""
    fields = dict(size="Ti", d_model=32, num_heads=4, num_layers=2, d_ff=64, patch_size=4,
                  image_size=16, num_classes=4, attention="xla")
    return ViTConfig(**{**fields, **overrides})


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(cfg, shape):
    return nn.unbox(jax.jit(ViT(cfg).init)(jax.random.key(0), jnp.zeros(shape)))


def _apply(cfg, **keywords):
    """ViT(cfg).apply as a jitted fn(variables, images, dropout rng=None): dispatching each op
    eagerly costs more than compiling."""
    def forward(variables, images, rng=None):
        rngs = {} if rng is None else {"dropout": rng}
        return ViT(cfg).apply(variables, images, rngs=rngs, **keywords)

    return jax.jit(forward)


def _count(cfg, shape=(1, 224, 224, 3)) -> int:
    shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), jnp.zeros(shape)))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))


def _block0_input(cfg, variables, images):
    """The tokens entering the first block (the embedded patches, positions and class token)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == "block_0":
            seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    def forward(variables, images):
        with nn.intercept_methods(record):
            ViT(cfg).apply(variables, images)
        return seen["x"]

    return np.asarray(jax.jit(forward)(variables, images))


def test_tables_are_keyed_by_the_config_choices():
    assert set(PATCH_EMBEDS) == set(get_args(vision_config.ViTPatchEmbed))
    assert set(POOLS) == set(get_args(vision_config.ViTPool))
    assert set(POSITIONS) == set(get_args(vision_config.ViTPosition))
    assert isinstance(build_model(_small()), ViT)
    assert MODELS["vit"].__qualname__ == "jaxscale.models.vit.ViT"


# --------------------------------------------------------------------------------------------
# Sizes.

def test_vit_b16_has_the_published_parameter_count():
    # patch 16*16*3*768 + 768, 197 positions (196 + the class token's) and the token, 12 blocks
    # of 7,087,872, the final norm 1,536, the head 768*1000 + 1000
    count = _count(ViTConfig(size="B"))
    assert count == 590_592 + 197 * 768 + 768 + 12 * 7_087_872 + 1_536 + 769_000 == 86_567_656
    assert abs(count - 86.6e6) / 86.6e6 < 1e-3


@pytest.mark.parametrize("size, published", [("Ti", 5.7e6), ("S", 22.1e6)])
def test_small_vits_have_the_published_parameter_counts(size, published):
    count = _count(ViTConfig(size=size))
    assert abs(count - published) / published < 0.02, count


def test_vit_b16_macs_by_hand():
    T, D, F = 197, 768, 3072
    patches = 196 * 16 * 16 * 3 * D
    layer = 4 * T * D * D + 2 * T * T * D + 2 * T * D * F
    hand = patches + 12 * layer + D * 1000
    assert forward_macs(ViTConfig(size="B"), (224, 224, 3)) == hand == 17_563_828_224
    gap = forward_macs(ViTConfig(size="B", pool="gap"), (224, 224, 3))
    assert hand - gap == 12 * (4 * D * D + 2 * (2 * T - 1) * D + 2 * D * F)  # one token fewer


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_macs_match_xla_on_small_instances(pool):
    # Width 64: norms, softmax and GELU (which XLA counts and the formula leaves out) cost
    # about 1/D of the matmuls, 9% at width 32.
    cfg = _small(d_model=64, d_ff=128, pool=pool, num_classes=10)
    model = ViT(cfg)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    compiled = jax.jit(model.apply).lower(
        variables, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / 2 / 2 / forward_macs(cfg, (16, 16, 3))  # 2 examples, 2 FLOPs/MAC
    assert 0.97 < ratio < 1.1, ratio


# --------------------------------------------------------------------------------------------
# A tiny ViT trained on a mesh.

def _steps(mesh_overrides, devices=None, n=3):
    cfg = config_lib.load("tiny", [*TINY, *mesh_overrides])
    run = build(cfg, mesh=make_mesh(cfg.mesh, devices=devices))
    pipeline, _ = run.task.pipelines(run.cfg, run.batch_shardings)
    state = run.init_state()
    losses = []
    # One batch, n times: the loss falls as the model fits it (fresh batches of the random
    # teacher differ from each other by more than three steps move a randomly read-out model).
    batch = pipeline.batch(0)
    for _ in range(n):
        state, metrics = run.train_step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return run, jax.device_get(state), losses


def test_tiny_vit_on_fsdp4_tensor2_equals_one_device():
    _, one, one_losses = _steps(["mesh.fsdp=1"], devices=jax.devices()[:1])
    run, many, losses = _steps(["mesh.fsdp=4", "mesh.tensor=2"])
    params = run.shardings.params
    assert "tensor" in str(params["block_0"]["attn"]["query"]["kernel"].spec)
    assert "tensor" in str(params["block_1"]["mlp"]["wi_up"]["kernel"].spec)
    assert "fsdp" in str(params["patch_embed"]["kernel"].spec)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0], losses
    for a, b in zip(jax.tree_util.tree_leaves(many.params), jax.tree_util.tree_leaves(one.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Positions.

def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of a half-pixel-centred linear upsampling (edges clamped)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (x - lo)
        m[i, hi] += x - lo
    return m


def test_learned_positions_interpolate_to_a_larger_grid():
    cfg = _small(pool="gap", patch_embed="dense")
    variables = _init(cfg, (1, 16, 16, 1))
    params = variables["params"]
    table = np.asarray(params["pos_embed"])
    assert table.shape == (16, 32)  # a 4x4 grid of width 32
    kernel, bias = np.asarray(params["patch_embed"]["kernel"]), params["patch_embed"]["bias"]

    def positions(images):
        patches = np.asarray(vit_lib.patchify(images, 4)) @ kernel + np.asarray(bias)
        return _block0_input(cfg, variables, images)[0] - patches[0]

    # The grid it was made for: the table as it is.
    np.testing.assert_allclose(positions(_images((1, 16, 16, 1))), table, atol=1e-5)
    # 32x32 inputs: an 8x8 grid, the table resized bilinearly (by hand, separably).
    m = _bilinear_matrix(4, 8)
    expected = np.einsum("ai,bj,ijd->abd", m, m, table.reshape(4, 4, 32)).reshape(64, 32)
    np.testing.assert_allclose(positions(_images((1, 32, 32, 1))), expected, atol=1e-5)
    # ...the same as a model made for 32x32 whose table is the resized one.
    big = dataclasses.replace(cfg, image_size=32)
    resized = {**params, "pos_embed": jnp.asarray(expected, jnp.float32)}
    images = _images((2, 32, 32, 1), seed=1)
    np.testing.assert_allclose(_apply(big)({"params": resized}, images),
                               _apply(cfg)(variables, images), rtol=1e-5, atol=1e-5)


def test_sincos_positions_are_fixed_and_equal_numpy():
    cfg = _small(pool="gap", position="sincos", patch_embed="dense", d_model=8, num_heads=2)
    images = _images((1, 8, 12, 1))  # a 2 x 3 grid: rows and columns differ
    variables = _init(cfg, images.shape)
    assert "pos_embed" not in variables["params"] and "cls_pos_embed" not in variables["params"]
    kernel, bias = (np.asarray(variables["params"]["patch_embed"][k]) for k in ("kernel", "bias"))
    got = _block0_input(cfg, variables, images)[0] - (
        np.asarray(vit_lib.patchify(images, 4))[0] @ kernel + bias)
    omega = 1.0 / 10_000.0 ** np.array([0.0, 1.0])  # width 8: two frequencies, 1 and 1e-4
    expected = []
    for row in range(2):
        for col in range(3):
            expected.append(np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                            np.sin(row * omega), np.cos(row * omega)]))
    np.testing.assert_allclose(got, np.array(expected), atol=1e-5)


def test_the_class_token_has_its_own_learned_position():
    cfg = _small(patch_embed="dense")
    variables = _init(cfg, (1, 16, 16, 1))
    params = variables["params"]
    x = _block0_input(cfg, variables, _images((1, 16, 16, 1)))
    assert x.shape == (1, 17, 32)
    np.testing.assert_allclose(x[0, 0], params["cls_token"] + params["cls_pos_embed"], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Patch embeddings and pools.

@pytest.mark.parametrize("embed", ["conv", "dense"])
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_each_patch_embed_and_pool_has_its_parameters(embed, pool):
    cfg = _small(patch_embed=embed, pool=pool)
    variables = _init(cfg, (1, 16, 16, 3))
    params = variables["params"]
    kernel = {"conv": (4, 4, 3, 32), "dense": (48, 32)}[embed]
    assert params["patch_embed"]["kernel"].shape == kernel
    assert params["pos_embed"].shape == (16, 32)
    names = {"cls_token", "cls_pos_embed"} & set(params)
    assert names == ({"cls_token", "cls_pos_embed"} if pool == "cls" else set())
    assert params["block_1"]["attn"]["query"]["kernel"].shape == (32, 4, 8)
    assert params["head"]["kernel"].shape == (32, 4)
    logits = _apply(cfg)(variables, _images((2, 16, 16, 3)))
    assert logits.shape == (2, 4) and bool(jnp.all(jnp.isfinite(logits)))


def test_dense_patch_embedding_is_a_reshape_and_a_matmul():
    cfg = _small(pool="gap", patch_embed="dense", position="sincos")
    images = np.asarray(_images((2, 8, 12, 2)))
    variables = _init(cfg, images.shape)
    kernel, bias = (np.asarray(variables["params"]["patch_embed"][k]) for k in ("kernel", "bias"))
    patches = np.zeros((2, 6, 32))  # a 2 x 3 grid of 4x4x2 patches, each flattened (row, col, c)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                patch = images[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4, :].reshape(-1)
                patches[b, 3 * r + c] = patch @ kernel + bias
    got = _block0_input(cfg, variables, jnp.asarray(images)) - np.asarray(
        vit_lib.sincos_positions(2, 3, 32))
    np.testing.assert_allclose(got, patches, rtol=1e-5, atol=1e-5)
    # A conv whose kernel is the dense one reshaped embeds the same way.
    conv_cfg = dataclasses.replace(cfg, patch_embed="conv")
    conv_params = {**variables["params"],
                   "patch_embed": {"kernel": jnp.asarray(kernel.reshape(4, 4, 2, 32)),
                                   "bias": jnp.asarray(bias)}}
    np.testing.assert_allclose(_apply(conv_cfg)({"params": conv_params}, images),
                               _apply(cfg)(variables, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "reference"])
def test_attention_is_bidirectional(attention):
    """Changing the last patch changes the first patch's output (a causal mask would not)."""
    cfg = _small(pool="gap", attention=attention)
    images = np.asarray(_images((1, 16, 16, 1)))
    variables = _init(cfg, images.shape)

    forward = _apply(cfg, capture_intermediates=True, mutable=["intermediates"])

    def first_token(x):
        _, state = forward(variables, jnp.asarray(x))
        out_BTD = state["intermediates"]["block_1"]["__call__"][0]
        return np.asarray(out_BTD[0, 0])

    changed = images.copy()
    changed[:, 12:, 12:, :] += 1.0  # the last 4x4 patch
    assert np.abs(first_token(changed) - first_token(images)).max() > 1e-3


# --------------------------------------------------------------------------------------------
# Stochastic depth.

def test_stochastic_depth_rates_rise_linearly():
    assert vit_lib.drop_rates(_small(num_layers=5, drop_path=0.2)) == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2])
    assert vit_lib.drop_rates(_small(num_layers=1, drop_path=0.2)) == [0.0]


def test_stochastic_depth_drops_whole_branches_per_example():
    """With drop_path=0.5 the last block's two branches are each kept (scaled by 2) or dropped
    per example; training outputs depend on the rng, eval outputs do not."""
    cfg = _small(pool="gap", drop_path=0.5)
    images = _images((16, 16, 16, 1))
    variables = _init(cfg, images.shape)
    forward = {train: _apply(cfg, train=train, capture_intermediates=True,
                             mutable=["intermediates"]) for train in (False, True)}

    def run(train, seed):
        return forward[train](variables, images, jax.random.key(seed))

    (a, _), (b, _) = run(True, 1), run(True, 2)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    (e1, _), (e2, _) = run(False, 1), run(False, 2)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    # Block 1 (rate 0.5): output - input = k1 * 2 attn + k2 * 2 mlp, k1, k2 in {0, 1}.
    _, state = run(True, 3)
    inter = state["intermediates"]
    x_in = np.asarray(inter["block_0"]["__call__"][0])
    out = np.asarray(inter["block_1"]["__call__"][0])
    attn = np.asarray(inter["block_1"]["attn"]["__call__"][0])
    mlp = np.asarray(inter["block_1"]["mlp"]["__call__"][0])
    kept = []
    for i in range(16):
        options = {(k1, k2): np.abs(out[i] - x_in[i] - 2 * k1 * attn[i] - 2 * k2 * mlp[i]).max()
                   for k1 in (0, 1) for k2 in (0, 1)}
        best = min(options, key=options.get)
        assert options[best] < 1e-4, options
        kept.append(best)
    assert {k for k, _ in kept} == {0, 1} and {k for _, k in kept} == {0, 1}, kept


def test_without_drop_path_training_equals_eval():
    cfg = _small(pool="cls")
    images = _images((4, 16, 16, 1))
    variables = _init(cfg, images.shape)
    train = _apply(cfg, train=True)(variables, images, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(train), np.asarray(_apply(cfg)(variables, images)))


def test_remat_keeps_the_gradients():
    cfg = _small(pool="gap")
    images = _images((2, 16, 16, 1))
    variables = _init(cfg, images.shape)

    def grads(c):
        loss = lambda p: jnp.sum(ViT(c).apply({"params": p}, images) ** 2)
        return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(variables["params"]))

    for a, b in zip(grads(dataclasses.replace(cfg, remat="full")), grads(cfg), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors.

def test_config_errors_are_one_line():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*TINY, "model.image_size=30", "model.patch_size=16"])
    assert str(e.value) == ("model.image_size=30 is not divisible by model.patch_size=16; choose "
                            "an image size that is a multiple of the patch size")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*TINY, "model.position=sincos", "model.d_model=18",
                                 "model.num_heads=2"])
    assert str(e.value) == ("model.position=sincos needs model.d_model=18 to be a multiple of 4 "
                            "(a quarter each for sin and cos of row and column)")


def test_an_input_the_patches_do_not_tile_is_an_error():
    with pytest.raises(config_lib.ConfigError) as e:
        ViT(_small()).init(jax.random.key(0), jnp.zeros((1, 18, 16, 1)))
    assert str(e.value) == ("images of shape 18x16x1 do not divide into model.patch_size=4 "
                            "patches; give inputs whose height and width are multiples of 4")
