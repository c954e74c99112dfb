"""ResNet image classifiers (He et al. 2015, "Deep Residual Learning"), in the v1.5 form.

Stem, stages of residual blocks (basic or bottleneck; the first block of every stage after the
first halves the resolution, and a block whose shape changes takes a 1x1 projection shortcut),
global average pooling and a dense head. The last norm of every residual branch starts with a
zero scale, so each block starts as the identity on its shortcut (Goyal et al. 2017). The norm is
chosen by `model.norm` (`jaxscale.models.norms`).

Convolution kernels are named ``(None, None, "conv_in", "conv_out")`` (the stem's input dimension
"channels": no mesh axis divides an image's 1 or 3 channels) and activations ``("batch",
"height", "width", "channels")``; the sharding rules decide the mesh axes.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     K classes
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.models.conv import IMAGE, conv, head, mean_pool, norm
from jaxscale.vision_config import ResNetConfig

EXPANSION = {"basic": 1, "bottleneck": 4}  # block kind -> output channels / stage width


def _conv(cfg: ResNetConfig, features: int, size: int, strides: int, name: str,
          in_axis: str = "conv_in") -> nn.Conv:
    return conv(cfg, features, size, strides, name=name, in_axis=in_axis)


def _norm(cfg: ResNetConfig, name: str, *, last: bool = False) -> nn.Module:
    return norm(cfg, name, zero_init=last)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first strided) on the residual branch."""

    cfg: ResNetConfig
    width: int  # channels of the branch and of the output
    strides: int = 1

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        y = _conv(cfg, self.width, 3, self.strides, "conv1")(x_BHWC)
        y = nn.relu(_norm(cfg, "norm1")(y, train))
        y = _conv(cfg, self.width, 3, 1, "conv2")(y)
        y = _norm(cfg, "norm2", last=True)(y, train)
        return _merge(cfg, x_BHWC, y, self.strides, train)


class BottleneckBlock(nn.Module):
    """1x1 down to `width`, a strided 3x3, 1x1 up to 4 x `width` on the residual branch."""

    cfg: ResNetConfig
    width: int  # channels inside the branch; the output has EXPANSION["bottleneck"] x width
    strides: int = 1

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        y = _conv(cfg, self.width, 1, 1, "conv1")(x_BHWC)
        y = nn.relu(_norm(cfg, "norm1")(y, train))
        y = _conv(cfg, self.width, 3, self.strides, "conv2")(y)
        y = nn.relu(_norm(cfg, "norm2")(y, train))
        y = _conv(cfg, EXPANSION["bottleneck"] * self.width, 1, 1, "conv3")(y)
        y = _norm(cfg, "norm3", last=True)(y, train)
        return _merge(cfg, x_BHWC, y, self.strides, train)


def _merge(cfg: ResNetConfig, x_BHWC: jax.Array, y_BHWC: jax.Array, strides: int,
           train: bool) -> jax.Array:
    """relu(branch + shortcut): the input itself, or a strided 1x1 projection of it when the
    shape changes. Called inside a block's compact method, so its modules belong to the block."""
    shortcut = x_BHWC
    if strides != 1 or x_BHWC.shape[-1] != y_BHWC.shape[-1]:
        shortcut = _conv(cfg, y_BHWC.shape[-1], 1, strides, "proj")(x_BHWC)
        shortcut = _norm(cfg, "proj_norm")(shortcut, train)
    return constrain(nn.relu(y_BHWC + shortcut), IMAGE)


# block kind -> its module; keyed like jaxscale.config.ResNetBlock (less "auto")
BLOCKS: dict[str, Callable[..., nn.Module]] = {"basic": BasicBlock,
                                               "bottleneck": BottleneckBlock}


def _stem_imagenet(cfg: ResNetConfig, x_BHWC: jax.Array, width: int, train: bool) -> jax.Array:
    x = _conv(cfg, width, 7, 2, "stem_conv", in_axis="channels")(x_BHWC)
    x = nn.relu(_norm(cfg, "stem_norm")(x, train))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _stem_small(cfg: ResNetConfig, x_BHWC: jax.Array, width: int, train: bool) -> jax.Array:
    x = _conv(cfg, width, 3, 1, "stem_conv", in_axis="channels")(x_BHWC)
    return nn.relu(_norm(cfg, "stem_norm")(x, train))


# stem name -> fn(cfg, images, width, train) called in the ResNet's compact method
STEMS: dict[str, Callable[..., jax.Array]] = {"imagenet": _stem_imagenet, "small": _stem_small}


class ResNet(nn.Module):
    """A ResNet of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        widths = cfg.stage_widths
        x_BHWC = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        x_BHWC = constrain(STEMS[cfg.stem](cfg, x_BHWC, widths[0], train), IMAGE)
        block = BLOCKS[cfg.block_kind]
        for s, (n, width) in enumerate(zip(cfg.stage_blocks, widths, strict=True)):
            for i in range(n):
                strides = 2 if s > 0 and i == 0 else 1
                x_BHWC = block(cfg, width, strides, name=f"stage{s + 1}_block{i + 1}")(
                    x_BHWC, train)
        return head(cfg, mean_pool(x_BHWC))
