"""EfficientNet and RegNet: torchvision's parameter counts, the published stage tables (compound
scaling and RegNet's width rule), squeeze-excitation and stochastic depth by hand, the config
errors, and tiny models trained on fsdp=8 equal to one device."""

from __future__ import annotations

from typing import get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import build_on, train_steps

from jaxscale import config as config_lib
from jaxscale import vision_config, zoo_config
from jaxscale.models import MODELS, build_model
from jaxscale.models.efficientnet import EfficientNet, MBConv, SqueezeExcite
from jaxscale.models.regnet import RegNet
from jaxscale.zoo_config import EfficientNetConfig, RegNetConfig

TRAIN = ["task.name=classify", "task.num_classes=4", "model.num_classes=4",
         "data.source=synthetic", "batch_size=16", "optim.name=sgd", "optim.lr=0.05",
         "optim.momentum=0.9", "optim.weight_decay=0", "optim.clip_norm=0",
         "optim.warmup_steps=0", "optim.schedule=constant", "progress=false"]
# B0's first three stages, of one block each (8, 8 and 16 channels; the first residual, the
# others expanding x6, one with a 5x5 kernel), on 16x16 images; no dropout, so that neither mesh
# draws random numbers (their masks could differ by sharding).
TINY_EFFICIENTNET = ["model.name=efficientnet", "model.width_mult=0.25", "model.depth_mult=0.5",
                     "model.num_stages=3", "model.stem=small", "model.dropout=0",
                     "model.drop_connect=0",
                     "task.input_shape=[16,16,3]", *TRAIN]
# Two stages (widths 8 and 16) of one Y block each.
TINY_REGNET = ["model.name=regnet", "model.w0=8", "model.wa=8", "model.wm=2", "model.depth=2",
               "model.group_width=8", "model.se=true", "task.input_shape=[16,16,3]", *TRAIN]
TINY = {"efficientnet": TINY_EFFICIENTNET, "regnet": TINY_REGNET}


def _param_count(model, size: int) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))


def test_registry_and_tables():
    assert isinstance(MODELS["efficientnet"](EfficientNetConfig()), EfficientNet)
    assert isinstance(MODELS["regnet"](RegNetConfig()), RegNet)
    assert zoo_config.SECTIONS["efficientnet"] is EfficientNetConfig
    assert zoo_config.SECTIONS["regnet"] is RegNetConfig
    assert set(zoo_config.EFFICIENTNET_VARIANTS) == set(
        get_args(zoo_config.EfficientNetVariant))
    assert set(zoo_config.REGNET_VARIANTS) == set(get_args(zoo_config.RegNetVariant))
    assert set(zoo_config.STEM_STRIDES) == set(get_args(vision_config.CNNStem))


# torchvision's counts (efficientnet_b*, regnet_*): the models' layouts and rounding, exactly.
@pytest.mark.parametrize("cfg, size, published", [
    (EfficientNetConfig(variant="b0"), 224, 5_288_548),
    (EfficientNetConfig(variant="b1"), 240, 7_794_184),
    (EfficientNetConfig(variant="b4"), 380, 19_341_616),
    (EfficientNetConfig(variant="b7"), 600, 66_347_960),
    (RegNetConfig(variant="regnety_400mf"), 224, 4_344_144),
    (RegNetConfig(variant="regnetx_400mf"), 224, 5_495_976),
    (RegNetConfig(variant="regnety_800mf"), 224, 6_432_512),
    (RegNetConfig(variant="regnetx_800mf"), 224, 7_259_656),
], ids=["b0", "b1", "b4", "b7", "regnety_400mf", "regnetx_400mf", "regnety_800mf",
        "regnetx_800mf"])
def test_parameter_counts_match_the_published_ones(cfg, size, published):
    if isinstance(cfg, EfficientNetConfig):
        assert cfg.resolution == size
    count = _param_count(build_model(cfg), size)
    assert abs(count - published) / published < 0.02, count
    assert count == published


def test_efficientnet_stage_tables():
    b0 = EfficientNetConfig(variant="b0")
    assert (b0.stem_width, b0.head_width) == (32, 1280)
    assert [(s[4], s[5]) for s in b0.stages] == [(16, 1), (24, 2), (40, 2), (80, 3), (112, 3),
                                                 (192, 4), (320, 1)]
    b4 = EfficientNetConfig(variant="b4")
    assert (b4.stem_width, b4.head_width) == (48, 1792)
    assert [s[4] for s in b4.stages] == [24, 32, 56, 112, 160, 272, 448]
    assert [s[5] for s in b4.stages] == [2, 4, 4, 6, 6, 8, 2]
    # Each stage's input is the previous stage's output (the stem's for the first).
    assert [s[3] for s in b4.stages] == [48, 24, 32, 56, 112, 160, 272]
    assert (b4.resolution, b4.head_dropout) == (380, 0.4)
    assert zoo_config.round_filters(10.0) == 16  # 8 would lose 20%: one multiple up


def test_regnet_width_rule():
    y = RegNetConfig(variant="regnety_400mf")
    assert y.stage_widths == (48, 104, 208, 440) and y.stage_depths == (1, 3, 6, 6)
    assert y.se_ratio == 0.25
    # torchvision's widths (the pycls paper tables list 384 for the last stage: pycls rounds
    # the quantised 392 to a multiple of 16 half-to-even, torchvision's rule, which gives its
    # 5,495,976 parameters, up to 400).
    x = RegNetConfig(variant="regnetx_400mf")
    assert x.block_widths[-1] == 392
    assert x.stage_widths == (32, 64, 160, 400) and x.stage_depths == (1, 2, 7, 12)
    assert x.se_ratio == 0.0
    tiny = config_lib.load("tiny", TINY_REGNET).model
    assert tiny.stage_layout == ((8, 1, 8), (16, 1, 8))


def test_regnet_blocks_group_and_squeeze_by_the_block_input():
    """A Y block's 3x3 has width / group_width groups and its squeeze width is a quarter of the
    block's input width; an X block has no squeeze-excitation."""
    shapes = {}
    for se in (True, False):
        model = build_model(RegNetConfig(w0=8, wa=8, wm=2, depth=2, group_width=8, se=se,
                                         num_classes=4))
        shapes[se] = nn.unbox(jax.eval_shape(lambda m=model: m.init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 3)))))["params"]
    block = shapes[True]["stage2_block1"]
    assert block["conv2"]["kernel"].shape == (3, 3, 8, 16)  # 16 channels in groups of 8
    assert block["se"]["reduce"]["kernel"].shape == (16, 2)  # 0.25 x the input's 8
    assert shapes[True]["stage1_block1"]["se"]["reduce"]["kernel"].shape == (8, 8)  # of 32
    assert "se" not in shapes[False]["stage2_block1"]


def test_squeeze_excitation_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    se = SqueezeExcite(EfficientNetConfig(), squeeze=2)
    params = nn.unbox(se.init(jax.random.key(0), jnp.asarray(x)))["params"]
    w1, b1 = rng.normal(size=(4, 2)), rng.normal(size=2)
    w2, b2 = rng.normal(size=(2, 4)), rng.normal(size=4)
    params = {"reduce": {"kernel": jnp.asarray(w1, jnp.float32),
                         "bias": jnp.asarray(b1, jnp.float32)},
              "expand": {"kernel": jnp.asarray(w2, jnp.float32),
                         "bias": jnp.asarray(b2, jnp.float32)}}
    y = np.asarray(se.apply({"params": params}, jnp.asarray(x)))
    h = x.astype(np.float64).mean((1, 2)) @ w1 + b1
    h = h / (1 + np.exp(-h))  # SiLU
    gate = 1 / (1 + np.exp(-(h @ w2 + b2)))  # [B, C], in (0, 1)
    np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_stochastic_depth_drops_whole_examples_in_training_only():
    """A residual MBConv at drop rate 0.5: each example's branch is either dropped or doubled;
    eval (any rng) and rate 0 are the plain block."""
    cfg = EfficientNetConfig()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4, 4, 8)), jnp.float32)
    block = MBConv(cfg, expand=1, kernel=3, strides=1, features=8, drop_rate=0.5)
    plain = MBConv(cfg, expand=1, kernel=3, strides=1, features=8)
    variables = nn.unbox(block.init(jax.random.key(0), x))

    def apply(module, train, seed):
        y, _ = module.apply(variables, x, train=train, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(seed)})
        return np.asarray(y)

    branch = apply(plain, True, 0) - np.asarray(x)
    dropped = apply(block, True, 0) - np.asarray(x)
    kept = np.abs(dropped).max((1, 2, 3)) > 0
    assert 0 < kept.sum() < 16, kept
    np.testing.assert_allclose(dropped[kept], 2 * branch[kept], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dropped[~kept], 0)
    assert np.abs(apply(block, True, 1) - apply(block, True, 0)).max() > 0  # another rng
    np.testing.assert_array_equal(apply(block, False, 0), apply(block, False, 1))
    np.testing.assert_array_equal(apply(block, False, 0), apply(plain, False, 0))
    # B0's 16 blocks: rates from 0 up by 0.2 / 16 a block.
    np.testing.assert_allclose(EfficientNetConfig().drop_rates, 0.2 * np.arange(16) / 16)


@pytest.mark.parametrize("family, override, message", [
    ("efficientnet", "model.variant=b9",
     "model.variant='b9' is not valid; choose one of: b0, b1, b2, b3, b4, b5, b6, b7"),
    ("efficientnet", "model.drop_connect=1.0", "model.drop_connect=1.0 must be in [0, 1)"),
    ("efficientnet", "model.dropout=1.5",
     "model.dropout=1.5 must be in [0, 1) (or -1: model.variant=b0's)"),
    ("efficientnet", "model.width_mult=-1",
     "model.width_mult=-1.0 must be >= 0 (0 = model.variant=b0's)"),
    ("regnet", "model.variant=regnetz_400mf",
     "model.variant='regnetz_400mf' is not valid; choose one of: regnetx_400mf, regnetx_800mf, "
     "regnety_400mf, regnety_800mf (did you mean 'regnety_400mf'?)"),
    ("regnet", "model.w0=12",
     "model.w0=12 must be a multiple of 8 (the widths are quantised to multiples of it)"),
    ("regnet", "model.wm=1",
     "model.wm=1.0 must be above 1 (each stage is wider than the last)"),
    ("regnet", "model.depth=-2",
     "model.depth=-2 must be >= 0 (0 = model.variant=regnety_400mf's)"),
    ("regnet", "model.bn_momentum=1", "model.bn_momentum=1.0 must be in [0, 1)"),
])
def test_config_errors(family, override, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*TINY[family], override])
    assert str(e.value) == message


@pytest.mark.parametrize("family, section", [("efficientnet", EfficientNetConfig),
                                             ("regnet", RegNetConfig)])
def test_config_selects_the_section_and_reloads(family, section):
    cfg = config_lib.load("tiny", TINY[family])
    assert isinstance(cfg.model, section)
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


# --------------------------------------------------------------------------------------------
# Tiny models trained on fsdp=8 and on one device.

def _steps(family, mesh_overrides, devices=None):
    run = build_on([*TINY[family], *mesh_overrides], devices)
    return run, *train_steps(run)


@pytest.fixture(scope="module", params=["efficientnet", "regnet"])
def one_device(request):
    return request.param, _steps(request.param, ["mesh.fsdp=1"], devices=jax.devices()[:1])


def test_tiny_model_on_fsdp8_equals_one_device(one_device):
    family, (_, one, one_losses) = one_device
    run, many, losses = _steps(family, ["mesh.fsdp=8"])
    spec = run.shardings.params["stage2_block1"]["project_conv" if family == "efficientnet"
                                                 else "conv3"]["kernel"].spec
    assert "fsdp" in str(spec), spec  # the kernels are sharded over the devices
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0], losses
    for a, b in zip(jax.tree_util.tree_leaves(many.params), jax.tree_util.tree_leaves(one.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stats, stats1 = many.extra["batch_stats"], one.extra["batch_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats1),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(np.abs(stats1["stem_norm"]["mean"]).max()) > 1e-4  # the statistics moved
