"""Building blocks shared by the convolutional models (ResNet and the CNN zoo).

A CNN's config section carries the fields these read: `dtype` and `param_dtype`, and for the
norms `norm`, `norm_groups`, `norm_eps`, `bn_momentum` and `bn_group_size` (see
`jaxscale.vision_config.ResNetConfig`).

Convolution kernels are named ``(None, None, "conv_in", "conv_out")``: a first conv's input
dimension is "channels" (no mesh axis divides an image's 1 or 3 channels) and a depthwise
kernel's is None (its input dimension is 1). Activations are ``("batch", "height", "width",
"channels")`` (`IMAGE`); the sharding rules decide the mesh axes.

Shape legend for tensor names (``x_BHWC``):
  B batch     H height     W width     C channels     K classes
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.models.norms import make_norm

IMAGE = ("batch", "height", "width", "channels")  # logical names of an activation x_BHWC
HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # as torchvision's convs
LECUN_INIT = nn.initializers.lecun_normal()


def conv(cfg: Any, features: int, size: int, strides: int = 1, *, name: str,
         in_axis: str | None = "conv_in", groups: int = 1, bias: bool = False,
         padding: Any = None, kernel_init=HE_INIT) -> nn.Conv:
    """A conv with 'same'-style padding (size // 2 each side, as in the papers) by default.

    Args:
      in_axis: the logical name of the kernel's input dimension ("channels" for a first conv,
        None for a depthwise one).
      groups: feature groups (the input channels for depthwise, RegNet's group width).
    """
    pad = size // 2
    return nn.Conv(
        features, (size, size), strides=(strides, strides),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        feature_group_count=groups, use_bias=bias, dtype=dtype(cfg.dtype),
        param_dtype=dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, in_axis, "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def norm(cfg: Any, name: str, *, zero_init: bool = False) -> nn.Module:
    """The norm `cfg.norm` names; `zero_init` starts its scale at 0 (a residual branch that
    starts as nothing, so its block starts as the identity)."""
    return make_norm(
        cfg.norm, groups=cfg.norm_groups, momentum=cfg.bn_momentum,
        group_size=cfg.bn_group_size, epsilon=cfg.norm_eps, param_dtype=dtype(cfg.param_dtype),
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones, name=name,
    )


def mean_pool(x_BHWC: jax.Array) -> jax.Array:
    """Global average pooling -> x_BC, in float32: a bf16 sum over H x W positions loses
    digits."""
    return constrain(jnp.mean(x_BHWC.astype(jnp.float32), axis=(1, 2)), ("batch", "act_embed"))


def dense(cfg: Any, features: int, *, name: str, out_axis: str = "vocab",
          kernel_init=LECUN_INIT) -> nn.Dense:
    """A dense layer on pooled features x_BC: a classifier head (out_axis "vocab", whose
    activation is named "act_vocab") or a hidden layer of one (out_axis "mlp")."""
    return nn.Dense(
        features, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        name=name,
    )


def head(cfg: Any, x_BC: jax.Array, name: str = "head") -> jax.Array:
    """The classifier: pooled features x_BC -> logits_BK (K = cfg.num_classes)."""
    logits_BK = dense(cfg, cfg.num_classes, name=name)(x_BC.astype(dtype(cfg.dtype)))
    return constrain(logits_BK, ("batch", "act_vocab"))
