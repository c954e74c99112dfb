"""ResNet and the norms: published parameter counts, every norm against numpy, float32
statistics under bf16, batch norm over the global batch (an all-reduce on fsdp=8, equal to one
device), ghost batch norm by hand, zero-init blocks, and a tiny ResNet trained on three meshes
equal to one device."""

from __future__ import annotations

import dataclasses
from typing import get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from util import build_on, train_steps

from jaxscale import config as config_lib
from jaxscale import vision_config
from jaxscale.analysis import hlo
from jaxscale.core.mesh import make_mesh
from jaxscale.models import MODELS
from jaxscale.models.norms import KINDS, make_norm
from jaxscale.models.resnet import BLOCKS, STEMS, BasicBlock, BottleneckBlock, ResNet
from jaxscale.run.build import build
from jaxscale.vision_config import NORM_KINDS, ResNetConfig

EPS = 1e-5
TINY = ["model.name=resnet", "model.blocks=[1,1]", "model.width=8", "model.num_classes=4",
        "model.stem=small", "task.name=classify", "task.num_classes=4",
        "task.input_shape=[8,8,1]", "data.source=synthetic", "batch_size=16", "optim.name=sgd",
        "optim.lr=0.05",
        "optim.momentum=0.9", "optim.weight_decay=0", "optim.clip_norm=0",
        "optim.warmup_steps=0", "optim.schedule=constant", "progress=false"]


def test_tables_are_keyed_by_the_config_choices():
    assert tuple(KINDS) == NORM_KINDS
    assert set(BLOCKS) == set(get_args(vision_config.ResNetBlock)) - {"auto"}
    assert set(STEMS) == set(get_args(vision_config.CNNStem))
    assert MODELS["resnet"] is ResNet


@pytest.mark.parametrize("depth, published", [(18, 11.69e6), (34, 21.80e6), (50, 25.56e6)])
def test_parameter_counts_match_the_published_ones(depth, published):
    model = ResNet(ResNetConfig(depth=depth, num_classes=1000))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert abs(count - published) / published < 0.02, count


# --------------------------------------------------------------------------------------------
# Norms against numpy.

def _reference(x, kind, scale, bias, groups=2):
    """Each kind written out on x [B, H, W, C] (float64 numpy)."""
    x = np.asarray(x, np.float64)
    B, H, W, C = x.shape
    if kind == "rms":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + EPS) * scale
    if kind == "group":
        xg = x.reshape(B, H, W, groups, C // groups)
        mean, var = xg.mean((1, 2, 4), keepdims=True), xg.var((1, 2, 4), keepdims=True)
        y = ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape)
    else:
        axes = {"batch": (0, 1, 2), "instance": (1, 2), "layer": (3,)}[kind]
        mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + EPS)
    return y * scale + bias


def _apply_norm(kind, x, *, group_size=0, scale=None, bias=None):
    """The norm applied in training mode; returns (output, batch statistics or {})."""
    norm = make_norm(kind, groups=2, group_size=group_size, epsilon=EPS)
    variables = dict(nn.unbox(norm.init(jax.random.key(0), jnp.zeros(x.shape, jnp.float32))))
    params = dict(variables["params"])
    if scale is not None:
        params["scale"] = jnp.asarray(scale, params["scale"].dtype)
    if "bias" in params and bias is not None:
        params["bias"] = jnp.asarray(bias, params["bias"].dtype)
    variables["params"] = params
    y, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
    return y, jax.device_get(updates.get("batch_stats", {}))


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_each_norm_equals_numpy(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, (4, 3, 3, 8)).astype(np.float32)
    scale, bias = rng.normal(1, 0.3, 8), rng.normal(0, 0.3, 8)
    y, stats = _apply_norm(kind, jnp.asarray(x), scale=scale, bias=bias)
    expected = _reference(x, kind, scale, 0.0 if kind == "rms" else bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    if kind == "batch":  # running averages moved by (1 - momentum) towards this batch's
        np.testing.assert_allclose(stats["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_bf16_inputs_keep_float32_statistics(kind):
    rng = np.random.default_rng(1)
    # A large offset: a bf16 mean (8 significant bits) would be off by far more than 1e-6.
    x16 = jnp.asarray(rng.normal(100.0, 1.0, (8, 4, 4, 8)), jnp.bfloat16)
    x = np.asarray(x16.astype(jnp.float32))  # the values the norm sees, exactly
    y, stats = _apply_norm(kind, x16)
    assert y.dtype == jnp.bfloat16
    expected = _reference(x, kind, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=2e-2, atol=2e-2)
    if kind == "batch":
        assert stats["mean"].dtype == np.float32
        np.testing.assert_allclose(stats["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-6)


def test_ghost_batch_norm_by_hand():
    # Four examples of two channels, in ghost groups of two.
    x = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 4.0], [14.0, 8.0]], np.float32)
    x_B11C = x.reshape(4, 1, 1, 2)
    y, stats = _apply_norm("batch", jnp.asarray(x_B11C), group_size=2)
    y = np.asarray(y).reshape(4, 2)
    # Group 1: means (2, 1), variances (1, 1); group 2: means (12, 6), variances (4, 4).
    mean = np.array([[2.0, 1.0], [2.0, 1.0], [12.0, 6.0], [12.0, 6.0]])
    var = np.array([[1.0, 1.0], [1.0, 1.0], [4.0, 4.0], [4.0, 4.0]])
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + EPS), rtol=1e-5)
    # Running averages: 0.9 x initial + 0.1 x the mean over the groups of their statistics.
    np.testing.assert_allclose(stats["mean"], 0.1 * np.array([7.0, 3.5]), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.array([2.5, 2.5]), rtol=1e-6)
    whole, _ = _apply_norm("batch", jnp.asarray(x_B11C))
    assert np.abs(np.asarray(whole).reshape(4, 2) - y).max() > 0.1


def test_batch_norm_statistics_are_over_the_global_batch():
    """A batch-sharded BN forward on fsdp=8 reduces across devices (an all-reduce in its HLO)
    and gives one device's statistics and outputs."""
    x = jnp.asarray(np.random.default_rng(2).normal(0.5, 2.0, (16, 4, 4, 8)), jnp.float32)
    norm = make_norm("batch")
    variables = nn.unbox(norm.init(jax.random.key(0), x))

    def forward(v, x):
        return norm.apply(v, x, train=True, mutable=["batch_stats"])

    mesh = make_mesh(config_lib.load("tiny", ["mesh.fsdp=8"]).mesh)
    x8 = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp")))
    compiled = jax.jit(forward).lower(variables, x8).compile()
    kinds = {c.kind for c in hlo.collectives(compiled.as_text(), num_devices=8)}
    assert "all-reduce" in kinds, kinds
    y8, stats8 = compiled(variables, x8)
    with jax.default_device(jax.devices()[0]):
        y1, stats1 = jax.jit(forward)(variables, x)
    np.testing.assert_allclose(np.asarray(y8), np.asarray(y1), rtol=1e-5, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(stats8["batch_stats"][name]),
                                   np.asarray(stats1["batch_stats"][name]), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Blocks.

@pytest.mark.parametrize("block, width", [(BasicBlock, 8), (BottleneckBlock, 2)])
def test_blocks_start_as_the_identity(block, width):
    """The last norm of the residual branch has a zero scale: at init the block returns
    relu(x), which is x for the non-negative output of a previous block."""
    cfg = ResNetConfig(blocks=(1,), width=width)
    x_BHWC = jnp.asarray(np.abs(np.random.default_rng(3).normal(size=(4, 4, 4, 8))), jnp.float32)
    module = block(cfg, width)
    variables = nn.unbox(module.init(jax.random.key(0), x_BHWC))
    last = "norm2" if block is BasicBlock else "norm3"
    assert not np.any(np.asarray(variables["params"][last]["scale"]))
    assert "proj" not in variables["params"]  # same shape: the identity shortcut
    for train in (False, True):
        y, _ = module.apply(variables, x_BHWC, train=train, mutable=["batch_stats"])
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x_BHWC))


def test_a_strided_block_projects_its_shortcut():
    cfg = ResNetConfig(blocks=(1,), width=8)
    x_BHWC = jnp.zeros((2, 8, 8, 4))
    variables = nn.unbox(BasicBlock(cfg, 8, strides=2).init(jax.random.key(0), x_BHWC))
    y = BasicBlock(cfg, 8, strides=2).apply(variables, x_BHWC)
    assert y.shape == (2, 4, 4, 8)
    assert variables["params"]["proj"]["kernel"].shape == (1, 1, 4, 8)


def test_resnet50_builds_under_the_auto_rules():
    """At 224x224 on fsdp=4 x tensor=2 the default rules split conv kernels [kh, kw, in, out]
    as (fsdp, tensor), keep the stem's 3 input channels whole and replicate the norms."""
    cfg = config_lib.load("tiny", [
        "model.name=resnet", "model.depth=50", "task.name=classify", "task.num_classes=1000",
        "data.source=synthetic",
        "task.input_shape=[224,224,3]", "batch_size=16", "mesh.fsdp=4", "mesh.tensor=2"])
    params = build(cfg).shardings.params
    assert params["stem_conv"]["kernel"].spec == PartitionSpec(None, None, None, "tensor")
    assert params["stage2_block1"]["conv2"]["kernel"].spec == PartitionSpec(
        None, None, "fsdp", "tensor")
    assert params["head"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    assert params["stage1_block1"]["norm1"]["scale"].spec == PartitionSpec(None)


# --------------------------------------------------------------------------------------------
# A tiny ResNet trained on three meshes.

def _steps(mesh_overrides, devices=None):
    run = build_on([*TINY, *mesh_overrides], devices)  # the model model.name names
    return run, *train_steps(run)


@pytest.fixture(scope="module")
def one_device():
    return _steps(["mesh.fsdp=1"], devices=jax.devices()[:1])


def test_config_selects_the_resnet_section():
    cfg = config_lib.load("tiny", TINY)
    assert isinstance(cfg.model, ResNetConfig) and cfg.model.stage_blocks == (1, 1)
    assert cfg.model.block_kind == "basic"
    assert dataclasses.replace(cfg.model, depth=50, blocks=()).block_kind == "bottleneck"
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg  # a saved config reloads
    with pytest.raises(config_lib.ConfigError, match="model.bn_group_size=-1"):
        config_lib.load("tiny", [*TINY, "model.bn_group_size=-1"])
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*TINY, "task.num_classes=10"])
    assert str(e.value) == ("model.num_classes=4 does not match task.num_classes=10: the head "
                            "must have a logit per label")


@pytest.mark.parametrize("mesh", [["mesh.fsdp=8"], ["mesh.data=4", "mesh.fsdp=2"]],
                         ids=["fsdp8", "data4xfsdp2"])
def test_tiny_resnet_on_a_mesh_equals_one_device(one_device, mesh):
    _, one, one_losses = one_device
    run, many, losses = _steps(mesh)
    # The first stage's convs split their input channels over fsdp (the auto rules).
    spec = run.shardings.params["stage1_block1"]["conv1"]["kernel"].spec
    assert "fsdp" in str(spec), spec
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree_util.tree_leaves(many.params), jax.tree_util.tree_leaves(one.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stats, stats1 = many.extra["batch_stats"], one.extra["batch_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats1),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The statistics moved: the step updated them (from mean 0, var 1).
    assert float(np.abs(stats1["stem_norm"]["mean"]).max()) > 1e-3


@pytest.mark.parametrize("rules, mesh, split", [
    ("dp", ["mesh.data=8", "mesh.fsdp=1"], ()),
    ("fsdp", ["mesh.fsdp=8"], ("fsdp",)),
    ("tp", ["mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2"], ("tensor",)),
    ("fsdp_tp", ["mesh.fsdp=4", "mesh.tensor=2"], ("fsdp", "tensor")),
])
def test_every_rule_preset_names_the_image_dimensions(rules, mesh, split):
    """The presets have rules for conv kernels and image activations, like `auto`."""
    cfg = config_lib.load("tiny", [*TINY, "model.width=16", *mesh, f"sharding.rules={rules}"])
    spec = build(cfg).shardings.params["stage1_block1"]["conv1"]["kernel"].spec
    axes = {a for d in spec if d for a in ((d,) if isinstance(d, str) else d)}
    assert axes - {"data"} == set(split), spec
