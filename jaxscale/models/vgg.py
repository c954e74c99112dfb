"""VGG image classifiers (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks").

Five stages of 3x3 convs (each followed by a ReLU, and with `model.batch_norm` by a norm as in
torchvision's vgg*_bn), a 2x2 stride-2 max-pool after every stage, an adaptive average pool to
`pool_size` x `pool_size` (7x7, as torchvision's), and a classifier of two hidden dense layers
with dropout and a dense head. Without a norm the convs carry a bias, as published.

The adaptive pool averages, for output row i of n, the input rows floor(i H / n) to
ceil((i + 1) H / n) - 1, as torch's AdaptiveAvgPool2d; written as a fixed averaging matrix per
axis, so an input smaller than n (a 32x32 image leaves a 1x1 map) repeats its rows and columns
instead of failing, and the classifier keeps its published shape for any image size.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     K classes
  P pooled rows (pool_size)     Q pooled columns (pool_size)     D flattened features (P Q C)
  F hidden width of the classifier (head_width)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.errors import ConfigError
from jaxscale.models.conv import IMAGE, conv, dense, head, norm
from jaxscale.zoo_config import VGGConfig


def adaptive_weights(size: int, out: int) -> np.ndarray:
    """The [out, size] matrix whose row i averages input positions floor(i size / out) ..
    ceil((i + 1) size / out) - 1 (torch's adaptive windows; each at least one position)."""
    weights = np.zeros((out, size), np.float32)
    for i in range(out):
        start, stop = (i * size) // out, -((-(i + 1) * size) // out)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def adaptive_avg_pool(x_BHWC: jax.Array, out: int) -> jax.Array:
    """x_BHWC -> x_BPQC (P = Q = out) by adaptive average windows, in float32."""
    _, h, w, _ = x_BHWC.shape
    rows_PH, cols_QW = adaptive_weights(h, out), adaptive_weights(w, out)
    return jnp.einsum("ph,bhwc,qw->bpqc", rows_PH, x_BHWC.astype(jnp.float32), cols_QW)


class VGG(nn.Module):
    """A VGG of `cfg`: images_BHWC (float) -> logits_BK."""

    cfg: VGGConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        reduction = 2 ** len(cfg.stage_convs)  # a 2x2 max-pool ends every stage
        if min(images_BHWC.shape[1:3]) < reduction:
            raise ConfigError(
                f"images of {images_BHWC.shape[1]}x{images_BHWC.shape[2]} are too small for "
                f"VGG's {len(cfg.stage_convs)} 2x2 max-pools; give images of at least "
                f"{reduction}x{reduction}")
        x_BHWC = constrain(images_BHWC.astype(dtype(cfg.dtype)), IMAGE)
        in_axis = "channels"  # the image's channels: no mesh axis divides 1 or 3 of them
        for s, (n, width) in enumerate(zip(cfg.stage_convs, cfg.stage_widths, strict=True)):
            for i in range(n):
                name = f"stage{s + 1}_conv{i + 1}"
                x_BHWC = conv(cfg, width, 3, name=name, in_axis=in_axis,
                              bias=not cfg.batch_norm)(x_BHWC)
                if cfg.batch_norm:
                    x_BHWC = norm(cfg, f"{name}_norm")(x_BHWC, train)
                x_BHWC = constrain(nn.relu(x_BHWC), IMAGE)
                in_axis = "conv_in"
            x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2))
        x_BPQC = adaptive_avg_pool(x_BHWC, cfg.pool_size)
        x_BD = constrain(x_BPQC.reshape(x_BPQC.shape[0], -1), ("batch", "act_embed"))
        x_BD = x_BD.astype(dtype(cfg.dtype))
        for i in (1, 2):
            x_BF = nn.relu(dense(cfg, cfg.head_width, name=f"fc{i}", out_axis="mlp")(x_BD))
            x_BF = nn.Dropout(cfg.dropout, deterministic=not train)(x_BF)
            x_BD = constrain(x_BF, ("batch", "act_mlp"))
        return head(cfg, x_BD)
