"""GoogLeNet image classifiers (Inception v1; Szegedy et al. 2014, "Going Deeper with
Convolutions"), in torchvision's form: every conv is followed by a norm (batch norm, eps 1e-3)
and a ReLU, and the two auxiliary classifiers are left out (they only fed extra losses in
training).

The branch the paper calls "5x5" is a 3x3 conv by default, as in torchvision's GoogLeNet (whose
ported weights have 3x3 kernels there; 6,624,904 parameters at 1000 classes); `model.wide_kernel=5`
gives the paper's 5x5. The channels of the inception blocks 3a..5b are the paper's table 1
(`jaxscale.zoo_config.GOOGLENET_BLOCKS`): an inception block concatenates a 1x1 branch, a 1x1
reduce then 3x3 branch, a 1x1 reduce then "5x5" branch and a 3x3 stride-1 max-pool then 1x1
projection branch (3a: 64 + 128 + 32 + 32 = 256 channels; 5b: 1024).

Layout: stem (7x7 stride-2 conv, max-pool, 1x1, 3x3, max-pool), inception 3a-3b, max-pool,
4a-4e, max-pool, 5a-5b, global average pooling, dropout and a dense head.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     K classes
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.models.conv import IMAGE, conv, head, mean_pool, norm
from jaxscale.zoo_config import GOOGLENET_STAGES, GOOGLENET_STEM, GoogLeNetConfig


def _max_pool_3x3(x_BHWC: jax.Array, strides: int) -> jax.Array:
    return nn.max_pool(x_BHWC, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))


class ConvNorm(nn.Module):
    """conv (no bias: the norm's shift replaces it), norm, ReLU."""

    cfg: GoogLeNetConfig
    features: int
    size: int
    strides: int = 1
    in_axis: str = "conv_in"

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.cfg, self.features, self.size, self.strides, name="conv",
                 in_axis=self.in_axis)(x_BHWC)
        return constrain(nn.relu(norm(self.cfg, "norm")(x, train)), IMAGE)


class Inception(nn.Module):
    """Four parallel branches concatenated along the channels."""

    cfg: GoogLeNetConfig
    block: str  # a key of GOOGLENET_BLOCKS ("3a" .. "5b")

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        c1, c3_red, c3, c5_red, c5, proj = cfg.blocks[self.block]
        b1 = ConvNorm(cfg, c1, 1, name="branch1")(x_BHWC, train)
        b3 = ConvNorm(cfg, c3_red, 1, name="branch3_reduce")(x_BHWC, train)
        b3 = ConvNorm(cfg, c3, 3, name="branch3")(b3, train)
        b5 = ConvNorm(cfg, c5_red, 1, name="branch5_reduce")(x_BHWC, train)
        b5 = ConvNorm(cfg, c5, cfg.wide_kernel, name="branch5")(b5, train)
        bp = ConvNorm(cfg, proj, 1, name="pool_proj")(_max_pool_3x3(x_BHWC, 1), train)
        return constrain(jnp.concatenate([b1, b3, b5, bp], axis=-1), IMAGE)


def _stem_imagenet(cfg: GoogLeNetConfig, x_BHWC: jax.Array, train: bool) -> jax.Array:
    w1, w2, w3 = map(cfg.width, GOOGLENET_STEM)
    x = ConvNorm(cfg, w1, 7, 2, in_axis="channels", name="stem_conv1")(x_BHWC, train)
    x = _max_pool_3x3(x, 2)
    x = ConvNorm(cfg, w2, 1, name="stem_conv2")(x, train)
    x = ConvNorm(cfg, w3, 3, name="stem_conv3")(x, train)
    return _max_pool_3x3(x, 2)


def _stem_small(cfg: GoogLeNetConfig, x_BHWC: jax.Array, train: bool) -> jax.Array:
    w1, w2, w3 = map(cfg.width, GOOGLENET_STEM)
    x = ConvNorm(cfg, w1, 3, in_axis="channels", name="stem_conv1")(x_BHWC, train)
    x = ConvNorm(cfg, w2, 1, name="stem_conv2")(x, train)
    return ConvNorm(cfg, w3, 3, name="stem_conv3")(x, train)


# stem name -> fn(cfg, images, train) called in GoogLeNet's compact method; keyed like
# jaxscale.vision_config.CNNStem
STEMS: dict[str, Callable[..., jax.Array]] = {"imagenet": _stem_imagenet, "small": _stem_small}


class GoogLeNet(nn.Module):
    """A GoogLeNet of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: GoogLeNetConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        x_BHWC = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        x_BHWC = STEMS[cfg.stem](cfg, x_BHWC, train)
        for s, stage in enumerate(GOOGLENET_STAGES):
            if s > 0:  # the 3x3 stride-2 max-pools between stages 3, 4 and 5
                x_BHWC = _max_pool_3x3(x_BHWC, 2)
            for block in stage:
                x_BHWC = Inception(cfg, block, name=f"inception{block}")(x_BHWC, train)
        x_BC = mean_pool(x_BHWC)
        x_BC = nn.Dropout(cfg.dropout, deterministic=not train)(x_BC)
        return head(cfg, x_BC)
