"""RegNet image classifiers (Radosavovic et al. 2020, "Designing Network Design Spaces").

A 3x3 stride-2 stem of 32 channels, four or so stages of residual bottleneck blocks, global
average pooling and a dense head. The stage widths and depths are not a table but follow from
four numbers (depth, w0, wa, wm) by the quantised linear rule of `RegNetConfig.block_widths`:
the paper's finding is that good networks' widths grow roughly linearly with depth. An X block
is 1x1 conv, grouped 3x3 conv (strided in a stage's first block; `group_width` channels per
group), 1x1 conv, each with a norm and all but the last with ReLU; a Y block adds
squeeze-excitation after the 3x3, its bottleneck a quarter of the block's input width. A block
whose shape changes takes a strided 1x1 projection shortcut.

Convolution kernels are named ``(None, None, "conv_in", "conv_out")`` and activations
``("batch", "height", "width", "channels")``; the sharding rules decide the mesh axes.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     K classes
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.models.conv import IMAGE, conv, head, mean_pool, norm
from jaxscale.models.efficientnet import SqueezeExcite
from jaxscale.zoo_config import REGNET_STEM, STEM_STRIDES, RegNetConfig


class RegNetBlock(nn.Module):
    """relu(shortcut + 1x1 -> grouped 3x3 [-> squeeze-excitation] -> 1x1), bottleneck ratio 1
    (the 3x3 runs at the output width)."""

    cfg: RegNetConfig
    width: int  # output channels (and those of the 3x3)
    group_width: int  # channels per group of the 3x3 conv
    strides: int = 1

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        c_in = x_BHWC.shape[-1]
        y = conv(cfg, self.width, 1, name="conv1")(x_BHWC)
        y = nn.relu(norm(cfg, "norm1")(y, train))
        y = conv(cfg, self.width, 3, self.strides, groups=self.width // self.group_width,
                 name="conv2")(y)
        y = constrain(nn.relu(norm(cfg, "norm2")(y, train)), IMAGE)
        if cfg.se_ratio:
            y = SqueezeExcite(cfg, round(cfg.se_ratio * c_in), nn.relu, name="se")(y)
        y = conv(cfg, self.width, 1, name="conv3")(y)
        y_BHWC = norm(cfg, "norm3")(y, train)
        shortcut = x_BHWC
        if self.strides != 1 or c_in != self.width:
            shortcut = conv(cfg, self.width, 1, self.strides, name="proj")(x_BHWC)
            shortcut = norm(cfg, "proj_norm")(shortcut, train)
        return constrain(nn.relu(y_BHWC + shortcut), IMAGE)


class RegNet(nn.Module):
    """A RegNet of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: RegNetConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        x = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        x = conv(cfg, REGNET_STEM, 3, STEM_STRIDES[cfg.stem], in_axis="channels",
                 name="stem_conv")(x)
        x_BHWC = constrain(nn.relu(norm(cfg, "stem_norm")(x, train)), IMAGE)
        for s, (width, blocks, group_width) in enumerate(cfg.stage_layout):
            for i in range(blocks):
                x_BHWC = RegNetBlock(cfg, width, group_width, 2 if i == 0 else 1,
                                     name=f"stage{s + 1}_block{i + 1}")(x_BHWC, train)
        return head(cfg, mean_pool(x_BHWC))
