"""EfficientNet image classifiers (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling").

A 3x3 stem, seven stages of MBConv blocks (inverted residuals: a 1x1 expansion, a depthwise kxk
conv, squeeze-excitation and a linear 1x1 projection), a 1x1 head conv, global average pooling,
dropout and a dense head; SiLU activations throughout. B1..B7 are B0 with every layer's channels
and every stage's repeats multiplied by the variant's factors (`EfficientNetConfig.stages`).
A residual block is dropped as a whole per example during training (stochastic depth, at a rate
growing linearly over the blocks), which regularises the deep variants.

Convolution kernels are named ``(None, None, "conv_in", "conv_out")`` (a depthwise kernel's
input dimension, of size 1, is None) and activations ``("batch", "height", "width",
"channels")``; the sharding rules decide the mesh axes.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     E expanded channels     S squeeze channels
  K classes
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.models.conv import HE_INIT, IMAGE, conv, head, mean_pool, norm
from jaxscale.zoo_config import STEM_STRIDES, EfficientNetConfig

SE_RATIO = 0.25  # squeeze channels / the MBConv block's input channels


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al. 2018): x times a per-channel gate in (0, 1) computed from
    the channels' spatial means by a two-layer bottleneck, so the block can weigh its channels by
    the whole image's content (which a kxk conv alone never sees)."""

    cfg: EfficientNetConfig  # any CNN section (reads dtype and param_dtype)
    squeeze: int  # channels of the bottleneck
    activation: Callable[[jax.Array], jax.Array] = nn.silu  # between the two layers

    @nn.compact
    def __call__(self, x_BHWE: jax.Array) -> jax.Array:
        cfg = self.cfg
        e = x_BHWE.shape[-1]
        s_BE = constrain(jnp.mean(x_BHWE.astype(jnp.float32), axis=(1, 2)).astype(x_BHWE.dtype),
                         ("batch", "act_embed"))
        # The bottleneck's S channels (often fewer than the devices) stay whole on every device.
        s_BS = self.activation(_dense(cfg, self.squeeze, ("conv_in", None), "reduce")(s_BE))
        gate_BE = nn.sigmoid(_dense(cfg, e, (None, "conv_out"), "expand")(s_BS))
        return constrain(x_BHWE * gate_BE[:, None, None, :], IMAGE)


def _dense(cfg: EfficientNetConfig, features: int, names: tuple[str | None, str | None],
           name: str) -> nn.Dense:
    """A layer of squeeze-excitation: a 1x1 conv on the pooled x_BC, so a dense layer (with a
    bias) whose kernel [C_in, C_out] is named like a conv kernel's last two dimensions."""
    return nn.Dense(
        features, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(HE_INIT, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name)


class MBConv(nn.Module):
    """An inverted residual block: 1x1 expansion (none when the ratio is 1), depthwise kxk conv
    (strided), squeeze-excitation, 1x1 linear projection; the input is added back when the
    shape is kept, with the branch dropped per example at rate `drop_rate` during training."""

    cfg: EfficientNetConfig
    expand: int  # expanded channels / input channels
    kernel: int  # side of the depthwise conv
    strides: int
    features: int  # output channels
    drop_rate: float = 0.0  # stochastic depth of the residual branch

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        c_in = x_BHWC.shape[-1]
        y = x_BHWC
        if self.expand != 1:
            y = conv(cfg, c_in * self.expand, 1, name="expand_conv")(y)
            y = nn.silu(norm(cfg, "expand_norm")(y, train))
        e = y.shape[-1]
        y = conv(cfg, e, self.kernel, self.strides, groups=e, in_axis=None, name="dw_conv")(y)
        y_BHWE = constrain(nn.silu(norm(cfg, "dw_norm")(y, train)), IMAGE)
        y_BHWE = SqueezeExcite(cfg, max(1, int(c_in * SE_RATIO)), nn.silu, name="se")(y_BHWE)
        y = conv(cfg, self.features, 1, name="project_conv")(y_BHWE)
        y_BHWC = norm(cfg, "project_norm")(y, train)
        if self.strides == 1 and c_in == self.features:
            y_BHWC = x_BHWC + drop_path(self, y_BHWC, self.drop_rate, train)
        return constrain(y_BHWC, IMAGE)


def drop_path(module: nn.Module, y_BHWC: jax.Array, rate: float, train: bool) -> jax.Array:
    """A residual branch zeroed for a random `rate` of the examples (rng stream "dropout") and
    scaled by 1 / (1 - rate) for the rest, so its expected value is unchanged; the identity at
    eval."""
    if not train or rate == 0.0:
        return y_BHWC
    keep = 1.0 - rate
    mask_B111 = jax.random.bernoulli(module.make_rng("dropout"), keep,
                                     (y_BHWC.shape[0], 1, 1, 1))
    return y_BHWC * (mask_B111.astype(y_BHWC.dtype) / keep)


class EfficientNet(nn.Module):
    """An EfficientNet of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: EfficientNetConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        x = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        x = conv(cfg, cfg.stem_width, 3, STEM_STRIDES[cfg.stem], in_axis="channels",
                 name="stem_conv")(x)
        x_BHWC = constrain(nn.silu(norm(cfg, "stem_norm")(x, train)), IMAGE)
        drop_rates = iter(cfg.drop_rates)  # one per block, growing linearly
        for s, (expand, kernel, strides, _, features, repeats) in enumerate(cfg.stages):
            for i in range(repeats):
                block = MBConv(cfg, expand, kernel, strides if i == 0 else 1, features,
                               next(drop_rates), name=f"stage{s + 1}_block{i + 1}")
                x_BHWC = block(x_BHWC, train)
        x = conv(cfg, cfg.head_width, 1, name="head_conv")(x_BHWC)
        x_BHWC = constrain(nn.silu(norm(cfg, "head_norm")(x, train)), IMAGE)
        x_BC = nn.Dropout(cfg.head_dropout, deterministic=not train)(mean_pool(x_BHWC))
        return head(cfg, x_BC)
