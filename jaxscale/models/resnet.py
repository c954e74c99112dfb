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


def _out(size: int, k: int, stride: int) -> int:
    """Output size of a k-wide window with 'same' padding k // 2 along a dimension of `size`."""
    return (size + 2 * (k // 2) - k) // stride + 1


def forward_macs(cfg: ResNetConfig, input_shape: tuple[int, ...]) -> float:
    """Multiply-accumulates of one example's forward pass: every conv and the head.

    A k x k conv from C_in to C_out channels with an H_out x W_out output costs
    ``H_out * W_out * k^2 * C_in * C_out`` (the count of the papers and of torchvision's
    tables); the head costs ``C * K``. Norms, activations, pooling and residual adds (a few
    operations per activation, against k^2 * C_in per output of a conv) are left out.
    ResNet-50 at 224 x 224 comes to 4.09 G (the paper's "3.8 x 10^9" counts the v1 layout,
    which strides a bottleneck's first 1x1 conv instead of its 3x3). XLA's cost analysis
    leaves out the taps that fall on the zero padding: a few percent less at 224, about 10%
    less when most maps are 8 x 8 or smaller.
    """
    h, w, channels = input_shape
    macs = 0.0

    def add_conv(c_in: int, c_out: int, k: int, stride: int) -> None:
        nonlocal h, w, macs
        h, w = _out(h, k, stride), _out(w, k, stride)
        macs += h * w * k * k * c_in * c_out

    widths = cfg.stage_widths
    if cfg.stem == "imagenet":
        add_conv(channels, widths[0], 7, 2)
        h, w = _out(h, 3, 2), _out(w, 3, 2)  # the 3x3 stride-2 max-pool
    else:
        add_conv(channels, widths[0], 3, 1)
    c = widths[0]
    expansion = EXPANSION[cfg.block_kind]
    for s, (n, width) in enumerate(zip(cfg.stage_blocks, widths, strict=True)):
        for i in range(n):
            stride = 2 if s > 0 and i == 0 else 1
            if stride != 1 or c != expansion * width:  # the 1x1 projection shortcut
                macs += _out(h, 1, stride) * _out(w, 1, stride) * c * expansion * width
            if cfg.block_kind == "basic":
                add_conv(c, width, 3, stride)
                add_conv(width, width, 3, 1)
            else:
                add_conv(c, width, 1, 1)
                add_conv(width, width, 3, stride)
                add_conv(width, expansion * width, 1, 1)
            c = expansion * width
    return macs + c * cfg.num_classes
