"""Compound scaling and the image models' FLOPs: ResNet's formula against hand counts and XLA's
cost analysis, FLOPs growing as (alpha * beta^2 * gamma^2)^phi, the scaled input shape reaching
the task, and `inspect` reporting parameters and FLOPs per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxscale import config as config_lib
from jaxscale.analysis.inspection import inspect_config
from jaxscale.models.resnet import ResNet, forward_macs
from jaxscale.run.build import build
from jaxscale.vision_config import ResNetConfig, ScaleConfig

TINY = ["model.name=resnet", "model.blocks=[1,1]", "model.width=8", "model.num_classes=4",
        "model.stem=small", "task.name=classify", "task.num_classes=4",
        "task.input_shape=[8,8,1]", "batch_size=16", "data.source=synthetic", "progress=false"]


def test_phi_zero_is_the_model_as_configured():
    scale = ScaleConfig()
    assert (scale.depth(7), scale.width(37), scale.resolution(30)) == (7, 37, 30)
    assert scale.depths((3, 4, 6, 3)) == (3, 4, 6, 3) and scale.flops_multiplier == 1.0


def test_scaled_sizes_round_as_documented():
    scale = ScaleConfig(phi=1)
    assert scale.width(64) == 72  # 70.4 to the nearest multiple of 8
    assert scale.width(32, divisor=16) == 32  # 35.2 -> 32, not under 90% of it
    assert scale.width(12, divisor=16) == 16  # never below the divisor
    assert scale.resolution(224) == 258 and scale.resolution(224, multiple=16) == 256
    assert scale.depth(12) == 14  # 14.4
    # 3.6 + 4.8 + 7.2 + 3.6 = 19.2 blocks -> 19, largest remainders first.
    assert scale.depths((3, 4, 6, 3)) == (4, 5, 7, 3)
    # 2.88 -> 3 blocks; each stage keeps >= 1 and a tie goes to the earlier stage.
    assert ScaleConfig(phi=2).depths((1, 1)) == (2, 1)
    assert scale.flops_multiplier == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load("tiny", [*TINY, "model.scale.beta=0.9"])
    assert str(e.value) == "model.scale.beta=0.9 must be >= 1 (a multiplier per unit of phi)"


def test_resnet18_macs_equal_a_hand_count():
    """Every conv of ResNet-18 at 224 written out: (H_out^2 x k^2 x C_in x C_out)."""
    conv = lambda h, k, c_in, c_out: h * h * k * k * c_in * c_out  # noqa: E731
    hand = conv(112, 7, 3, 64) + 4 * conv(56, 3, 64, 64)
    for h, c_in, c in ((28, 64, 128), (14, 128, 256), (7, 256, 512)):
        hand += conv(h, 3, c_in, c) + 3 * conv(h, 3, c, c) + conv(h, 1, c_in, c)
    hand += 512 * 1000
    assert forward_macs(ResNetConfig(depth=18), (224, 224, 3)) == hand == 1_814_073_344


def test_resnet50_is_about_4_1_giga_macs():
    assert forward_macs(ResNetConfig(depth=50), (224, 224, 3)) == pytest.approx(4.09e9, rel=1e-3)


def _xla_macs(cfg: ResNetConfig, shape: tuple[int, ...]) -> float:
    """XLA's count of one example's forward (lowered, not compiled) in multiply-accumulates."""
    model = ResNet(cfg)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    lowered = jax.jit(model.apply).lower(variables, jax.ShapeDtypeStruct((2, *shape),
                                                                         jnp.float32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 2 / 2  # 2 examples, 2 FLOPs per MAC


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_macs_match_xla_on_small_instances(block):
    cfg = ResNetConfig(blocks=(2, 2), block=block, width=32, stem="small", num_classes=10)
    ratio = _xla_macs(cfg, (32, 32, 3)) / forward_macs(cfg, (32, 32, 3))
    assert 0.9 < ratio < 1.1, ratio  # XLA leaves out the taps on the zero padding


def test_resnet_flops_follow_compound_scaling():
    base = None
    for phi in range(4):
        cfg = ResNetConfig(depth=34, num_classes=1000, scale=ScaleConfig(phi=phi))
        side = cfg.scale.resolution(224)
        flops = _xla_macs(cfg, (side, side, 3))
        base = base or flops
        expected = (1.2 * 1.1**2 * 1.15**2) ** phi
        assert abs(flops / base / expected - 1) < 0.15, (phi, flops / base, expected)


def test_scaled_resolution_reaches_the_task_and_inspect():
    cfg = config_lib.load("tiny", [*TINY, "model.scale.phi=2"])
    assert cfg.task.input_shape == (8, 8, 1)  # the config keeps what was asked
    run = build(cfg)
    assert run.task.input_shape == (11, 11, 1)  # 8 x 1.15^2 = 10.58
    assert run.batch_spec["images"].shape == (16, 11, 11, 1)
    assert cfg.model.stage_blocks == (2, 1) and cfg.model.stage_widths == (16, 24)
    macs = forward_macs(cfg.model, (11, 11, 1))
    assert run.flops_per_example() == 6 * macs
    report = inspect_config(cfg).format()
    params = sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_train_state().params))
    assert f"model: {params:,} parameters; inputs 11x11x1" in report
    assert f"{6 * macs * 16:.4g} (model count; " in report
    assert f"{6 * macs:.4g} per example)" in report
