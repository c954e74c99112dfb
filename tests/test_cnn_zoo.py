"""VGG, GoogLeNet and DenseNet: published parameter counts and layouts, a bad key's message, and
tiny versions trained on an fsdp=8 mesh equal to one device."""

from __future__ import annotations

from typing import get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import build_on, train_steps

from jaxscale import config as config_lib
from jaxscale import vision_config
from jaxscale.models import densenet, googlenet
from jaxscale.models.densenet import DenseNet
from jaxscale.models.googlenet import GoogLeNet
from jaxscale.models.vgg import VGG, adaptive_weights
from jaxscale.zoo_config import DenseNetConfig, GoogLeNetConfig, VGGConfig

OPTIM = ["data.source=synthetic", "batch_size=16", "optim.name=sgd", "optim.lr=0.05",
         "optim.momentum=0.9", "optim.weight_decay=0", "optim.clip_norm=0",
         "optim.warmup_steps=0", "optim.schedule=constant", "progress=false",
         "task.name=classify", "task.num_classes=4", "model.num_classes=4"]
# family -> overrides of a tiny version; the param whose input channels fsdp splits
TINY = {
    "vgg": (["model.name=vgg", "model.depth=11", "model.width_multiplier=0.0625",
             "model.head_width=32", "model.dropout=0", "model.batch_norm=true",
             "task.input_shape=[32,32,3]"], ("stage2_conv1", "kernel")),
    "densenet": (["model.name=densenet", "model.blocks=[1,1]", "model.growth_rate=8",
                  "model.init_features=8", "model.stem=small", "task.input_shape=[16,16,3]"],
                 ("block1_layer1", "conv1", "kernel")),
    "googlenet": (["model.name=googlenet", "model.width_multiplier=0.0625", "model.stem=small",
                   "model.dropout=0", "task.input_shape=[16,16,3]"],
                  ("inception3a", "branch1", "conv", "kernel")),
}


def _init_shapes(model, capture=False):
    return nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 224, 224, 3)), capture_intermediates=capture)))


def _count(shapes) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))


def test_stem_tables_are_keyed_by_the_config_choices():
    for module in (densenet, googlenet):
        assert set(module.STEMS) == set(get_args(vision_config.CNNStem))


@pytest.mark.parametrize("model, published", [
    (VGG(VGGConfig(depth=11)), 132_863_336), (VGG(VGGConfig(depth=16)), 138_357_544),
    (DenseNet(DenseNetConfig(depth=121)), 7_978_856),
    (GoogLeNet(GoogLeNetConfig()), 6_624_904),  # torchvision's, without the aux classifiers
    (GoogLeNet(GoogLeNetConfig(wide_kernel=5)), 7_005_832),  # the paper's 5x5 branch
], ids=["vgg11", "vgg16", "densenet121", "googlenet", "googlenet_5x5"])
def test_parameter_counts_match_the_published_ones(model, published):
    count = _count(_init_shapes(model))
    assert abs(count - published) / published < 0.02, count
    if isinstance(model, GoogLeNet):
        assert 6.6e6 <= count <= 7.0e6 + 0.01e6, count


@pytest.mark.parametrize("depth, convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_layouts(depth, convs):
    params = _init_shapes(VGG(VGGConfig(depth=depth)))["params"]
    kernels = [k for k in params if "conv" in k]
    assert len(kernels) == convs
    assert params["stage5_conv1"]["kernel"].shape == (3, 3, 512, 512)
    # The classifier sees the 7 x 7 x 512 adaptive pool whatever the input size.
    assert params["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)


def test_adaptive_pool_windows_as_torch():
    np.testing.assert_array_equal(adaptive_weights(1, 3), np.ones((3, 1)))  # repeats
    np.testing.assert_allclose(adaptive_weights(5, 3), [[1 / 2, 1 / 2, 0, 0, 0],
                                                        [0, 1 / 3, 1 / 3, 1 / 3, 0],
                                                        [0, 0, 0, 1 / 2, 1 / 2]])
    np.testing.assert_array_equal(adaptive_weights(14, 7), np.kron(np.eye(7), [[0.5, 0.5]]))


def test_densenet121_channels():
    shapes = _init_shapes(DenseNet(DenseNetConfig(depth=121)), capture=True)
    out = {k: v["__call__"][0].shape for k, v in shapes["intermediates"].items()
           if k != "__call__"}  # the net's own output is the logits
    assert out["block1_layer6"] == (1, 56, 56, 64 + 6 * 32) == (1, 56, 56, 256)
    assert out["transition1"] == (1, 28, 28, 128)
    assert out["block4_layer16"] == (1, 7, 7, 1024)


def test_googlenet_inception_outputs():
    shapes = _init_shapes(GoogLeNet(GoogLeNetConfig()), capture=True)
    channels = {k.removeprefix("inception"): v["__call__"][0].shape[-1]
                for k, v in shapes["intermediates"].items() if k.startswith("inception")}
    assert channels == {"3a": 256, "3b": 480, "4a": 512, "4b": 512, "4c": 512, "4d": 528,
                        "4e": 832, "5a": 832, "5b": 1024}


@pytest.mark.parametrize("family, override, message", [
    ("vgg", "model.depth=12",
     "model.depth=12 has no published layout; choose one of 11, 13, 16, 19"),
    ("densenet", "model.compression=1.5", "model.compression=1.5 must be in (0, 1]"),
    ("googlenet", "model.wide_kernel=7",
     "model.wide_kernel=7 must be 3 (torchvision's GoogLeNet) or 5 (the paper's 5x5)"),
])
def test_a_bad_key_names_itself(family, override, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*OPTIM, *TINY[family][0], override])
    assert str(e.value) == message


def test_vgg_says_when_images_are_too_small():
    model = VGG(VGGConfig(depth=11, width_multiplier=1 / 16, head_width=8, num_classes=4))
    with pytest.raises(config_lib.ConfigError) as e:
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
    assert str(e.value) == ("images of 16x16 are too small for VGG's 5 2x2 max-pools; give "
                            "images of at least 32x32")


# --------------------------------------------------------------------------------------------
# Tiny versions trained on a mesh and on one device.

def _steps(family, mesh_overrides, devices=None):
    run = build_on([*OPTIM, *TINY[family][0], *mesh_overrides], devices)
    return run, *train_steps(run)


@pytest.fixture(scope="module", params=["vgg", "densenet"])
def one_device(request):
    return request.param, _steps(request.param, ["mesh.fsdp=1"], devices=jax.devices()[:1])


def test_tiny_model_on_a_mesh_equals_one_device(one_device):
    family, (_, one, one_losses) = one_device
    run, many, losses = _steps(family, ["mesh.fsdp=8"])
    spec = run.shardings.params
    for key in TINY[family][1]:
        spec = spec[key]
    assert "fsdp" in str(spec.spec), spec
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for tree, tree1 in [(many.params, one.params),
                        (many.extra["batch_stats"], one.extra["batch_stats"])]:
        leaves, leaves1 = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(tree1)
        assert leaves
        for a, b in zip(leaves, leaves1, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_googlenet_step_on_a_mesh_equals_one_device():
    # GoogLeNet's trajectories part after two steps (a step-3 loss of 1.3402 on fsdp=8 against
    # 1.3422 on one device): its overlapping 3x3 max-pools, over 1x1 to 4x4 maps in this tiny
    # version, turn rounding-level differences into a different winner in a window, and each step
    # compounds it. So each step starts both meshes from the same state, the one device's, and
    # the step itself is compared: the loss and batch statistics to 1e-5, the whole update to 1%
    # of its size (the norm of the difference against the update's norm) and each parameter's
    # update to 5% of its size. A sharding error (a missing reduction, a wrong mean) moves a
    # parameter's update by its own size. A window's winner changing moves them a little: with
    # the libraries of 2026-12-07 on jax 0.10.2, step 1's update differs by 0.28% as a whole and
    # by 2.9% in its worst parameter (inception5a/branch5_reduce's norm bias); steps 0 and 2 by
    # 5e-6 and 1e-6 as a whole, 2e-4 at worst.
    overrides = [*OPTIM, *TINY["googlenet"][0]]
    one = build_on([*overrides, "mesh.fsdp=1"], jax.devices()[:1])
    many = build_on([*overrides, "mesh.fsdp=8"])
    assert "fsdp" in str(many.shardings.params["inception3a"]["branch1"]["conv"]["kernel"].spec)
    pipeline, _ = one.task.pipelines(one.cfg, one.batch_shardings)
    pipeline8, _ = many.task.pipelines(many.cfg, many.batch_shardings)
    state, losses = jax.device_get(one.init_state()), []
    for step in range(3):
        s1, m1 = one.train_step(jax.device_put(state, one.shardings), pipeline.batch(step),
                                jax.random.key(0))
        s8, m8 = many.train_step(jax.device_put(state, many.shardings), pipeline8.batch(step),
                                 jax.random.key(0))
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
        s1, s8 = jax.device_get(s1), jax.device_get(s8)
        for a, b in zip(jax.tree_util.tree_leaves(s8.extra["batch_stats"]),
                        jax.tree_util.tree_leaves(s1.extra["batch_stats"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        updates = jax.tree_util.tree_leaves_with_path(
            jax.tree.map(lambda a, b, c: (a - c, b - c), s8.params, s1.params, state.params),
            is_leaf=lambda x: isinstance(x, tuple))
        assert len(updates) == 57 * 3 + 2  # each conv's kernel, norm scale and bias; the head
        for path, (update8, update1) in updates:
            size = np.abs(update1).max()
            assert size > 0, path
            assert np.abs(update8 - update1).max() <= 5e-2 * size, (step, path)
        difference = sum(float(np.sum((u8 - u1) ** 2)) for _, (u8, u1) in updates)
        total = sum(float(np.sum(u1 ** 2)) for _, (_, u1) in updates)
        assert difference <= 1e-4 * total, (step, (difference / total) ** 0.5)
        state = s1
        losses.append(float(m1["loss"]))
    assert losses[-1] < losses[0]
