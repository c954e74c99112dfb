"""DenseNet-BC image classifiers (Huang et al. 2016, "Densely Connected Convolutional Networks").

A stem, dense blocks and transitions between them, a final norm and ReLU, global average pooling
and a dense head, as torchvision's densenet121/169/201. Each dense layer sees the concatenation of
the block's input and every earlier layer's output and adds `growth_rate` (k) channels of its own,
through a bottleneck: norm, ReLU, 1x1 conv to bn_size x k, norm, ReLU, 3x3 conv to k (the
"pre-activation" order: a norm and ReLU before each conv, so the concatenated features stay
unnormalised and every later layer normalises them its own way). A transition (norm, ReLU, 1x1
conv keeping `compression` of the channels, 2x2 average pool) halves the resolution and bounds
the width that concatenation grows. DenseNet-121: 64 + 6 x 32 = 256 channels after block 1, 128
after transition 1, 7,978,856 parameters at 1000 classes.

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
from jaxscale.zoo_config import DenseNetConfig


class DenseLayer(nn.Module):
    """norm-ReLU-1x1 (bn_size x k) -norm-ReLU-3x3 (k); returns the input with its k new channels
    appended."""

    cfg: DenseNetConfig

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        y = nn.relu(norm(cfg, "norm1")(x_BHWC, train))
        y = conv(cfg, cfg.bn_size * cfg.growth, 1, name="conv1")(y)
        y = nn.relu(norm(cfg, "norm2")(y, train))
        y = conv(cfg, cfg.growth, 3, name="conv2")(y)
        y = nn.Dropout(cfg.dropout, deterministic=not train)(y)
        return constrain(jnp.concatenate([x_BHWC, y.astype(x_BHWC.dtype)], axis=-1), IMAGE)


class Transition(nn.Module):
    """norm-ReLU-1x1 conv to floor(compression x C) channels, then a 2x2 stride-2 average pool."""

    cfg: DenseNetConfig

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        y = nn.relu(norm(cfg, "norm")(x_BHWC, train))
        y = conv(cfg, int(x_BHWC.shape[-1] * cfg.compression), 1, name="conv")(y)
        return constrain(nn.avg_pool(y, (2, 2), strides=(2, 2)), IMAGE)


def _stem_imagenet(cfg: DenseNetConfig, x_BHWC: jax.Array, train: bool) -> jax.Array:
    x = conv(cfg, cfg.stem_width, 7, 2, name="stem_conv", in_axis="channels")(x_BHWC)
    x = nn.relu(norm(cfg, "stem_norm")(x, train))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _stem_small(cfg: DenseNetConfig, x_BHWC: jax.Array, train: bool) -> jax.Array:
    # The paper's CIFAR nets: one 3x3 conv, no norm (the first dense layer normalises it).
    return conv(cfg, cfg.stem_width, 3, name="stem_conv", in_axis="channels")(x_BHWC)


# stem name -> fn(cfg, images, train) called in DenseNet's compact method; keyed like
# jaxscale.vision_config.CNNStem
STEMS: dict[str, Callable[..., jax.Array]] = {"imagenet": _stem_imagenet, "small": _stem_small}


class DenseNet(nn.Module):
    """A DenseNet of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: DenseNetConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        x_BHWC = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        x_BHWC = constrain(STEMS[cfg.stem](cfg, x_BHWC, train), IMAGE)
        layers = cfg.block_layers
        for b, n in enumerate(layers):
            for i in range(n):
                x_BHWC = DenseLayer(cfg, name=f"block{b + 1}_layer{i + 1}")(x_BHWC, train)
            if b < len(layers) - 1:
                x_BHWC = Transition(cfg, name=f"transition{b + 1}")(x_BHWC, train)
        x_BHWC = nn.relu(norm(cfg, "final_norm")(x_BHWC, train))
        return head(cfg, mean_pool(x_BHWC))
