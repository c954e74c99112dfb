"""Normalisation layers chosen by name: batch, group, instance, layer and RMS norm.

One module, `Norm`, covers the five kinds. An input ``x_B...C`` (batch first, channels last, any
spatial dimensions between) is viewed as ``x_NbSGc`` and each kind is the set of those axes its
statistics are taken over (`KINDS`):

  N ghost-BN groups (1 unless ``group_size`` is set)   b examples per group (B = N x b)
  S spatial positions (H x W, flattened)   G channel groups   c channels per group (C = G x c)

Statistics are always computed in float32, whatever the input's dtype (cast in, normalise, cast
back): a bf16 mean over a large batch loses digits that the running averages then keep.

Batch norm's statistics are over the global batch: the batch dimension is sharded over devices
by the sharding rules, and the mean of a batch-sharded array is, under GSPMD, a reduction across
the devices (an all-reduce in the compiled step; tests/test_resnet.py checks the HLO). With
``group_size=g`` (ghost batch norm) they are per group of g consecutive examples instead, and the
running averages move towards the mean of the groups' statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.validation import did_you_mean

BATCH_STATS = "batch_stats"  # the collection batch norm keeps its running averages in


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of norm reads the ``x_NbSGc`` view of its input."""

    axes: tuple[int, ...]  # the axes of x_NbSGc its statistics are taken over
    num_groups: Callable[[int, int], int]  # (channels C, configured groups) -> G
    center: bool = True  # subtract the mean (and learn a bias); RMS norm does not
    running: bool = False  # keeps running averages for inference (batch norm)


def _each(channels: int, groups: int) -> int:
    return channels  # one statistic per channel


def _configured(channels: int, groups: int) -> int:
    return groups


def _one(channels: int, groups: int) -> int:
    return 1  # all channels together


# kind name -> how it normalises; keyed like jaxscale.config.NORM_KINDS.
KINDS: dict[str, Kind] = {
    "batch": Kind(axes=(1, 2, 4), num_groups=_each, running=True),  # per channel
    "group": Kind(axes=(2, 4), num_groups=_configured),  # per example and channel group
    "instance": Kind(axes=(2, 4), num_groups=_each),  # per example and channel
    # per example and position, over the channels (channels-last LayerNorm, as in ConvNeXt)
    "layer": Kind(axes=(4,), num_groups=_one),
    "rms": Kind(axes=(4,), num_groups=_one, center=False),
}


def _view(x: jax.Array, kind: Kind, groups: int, group_size: int) -> jax.Array:
    """``x`` [B, ..., C] as float32 ``x_NbSGc``."""
    B, C = x.shape[0], x.shape[-1]
    S = math.prod(x.shape[1:-1])
    G = kind.num_groups(C, groups)
    if C % G:
        raise ValueError(f"{C} channels do not split into {G} norm groups")
    N = 1
    if kind.running and group_size:
        if B % group_size:
            raise ValueError(f"batch of {B} does not split into ghost-BN groups of {group_size}")
        N = B // group_size
    return x.astype(jnp.float32).reshape(N, B // N, S, G, C // G)


def statistics(x: jax.Array, kind: str, *, groups: int = 1,
               group_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """Mean and variance (float32) of `x` [B, ..., C] as norm `kind` takes them.

    Returns:
      ``mean_NbSGc, var_NbSGc``, each with size 1 on the reduced axes (mean is 0 for rms, whose
      "variance" is then the mean square).
    """
    k = KINDS[kind]
    x_NbSGc = _view(x, k, groups, group_size)
    if not k.center:
        return jnp.zeros((), jnp.float32), jnp.mean(jnp.square(x_NbSGc), k.axes, keepdims=True)
    mean = jnp.mean(x_NbSGc, k.axes, keepdims=True)
    return mean, jnp.mean(jnp.square(x_NbSGc - mean), k.axes, keepdims=True)


class Norm(nn.Module):
    """Normalisation over the axes `kind` names (see the module docstring), then a learned
    per-channel scale (and bias, unless rms).

    Attributes:
      kind: batch | group | instance | layer | rms.
      groups: group: channel groups.
      momentum: batch: running <- momentum x running + (1 - momentum) x this batch's statistic.
      group_size: batch: examples per ghost-BN group; 0 = the whole (global) batch.
      epsilon: added to the variance.
      param_dtype: dtype of scale and bias (running averages are float32).
      scale_init: initialiser of the scale (zeros for the last norm of a residual block).
      axis_name: logical name of the channel dimension of scale, bias and running averages.
    """

    kind: str = "batch"
    groups: int = 32
    momentum: float = 0.9
    group_size: int = 0
    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.kind not in KINDS:
            raise ValueError(f"norm kind {self.kind!r} is not one of {', '.join(KINDS)}"
                             + did_you_mean(self.kind, list(KINDS)))
        k = KINDS[self.kind]
        C = x.shape[-1]
        # Ghost groups split training batches only; inference reads the running averages.
        group_size = self.group_size if train else 0
        x_NbSGc = _view(x, k, self.groups, group_size)
        if k.running:
            mean, var = self._batch_statistics(x, train)
        else:
            mean, var = statistics(x, self.kind, groups=self.groups)
        y_NbSGc = (x_NbSGc - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y_NbSGc.reshape(x.shape)
        scale = self.param("scale", nn.with_logical_partitioning(self.scale_init,
                                                                 (self.axis_name,)),
                           (C,), self.param_dtype)
        y = y * scale.astype(jnp.float32)
        if k.center:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.axis_name,)),
                              (C,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)

    def _batch_statistics(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """This batch's statistics in training (and the running averages moved towards them),
        the running averages otherwise; shaped to broadcast against ``x_NbSGc``."""
        C = x.shape[-1]
        # Unboxed, like flax's BatchNorm: a few floats per channel, replicated on every device.
        ra_mean = self.variable(BATCH_STATS, "mean", jnp.zeros, (C,), jnp.float32)
        ra_var = self.variable(BATCH_STATS, "var", jnp.ones, (C,), jnp.float32)
        if not train:
            return ra_mean.value.reshape(1, 1, 1, C, 1), ra_var.value.reshape(1, 1, 1, C, 1)
        mean, var = statistics(x, "batch", group_size=self.group_size)
        if not self.is_initializing():
            # Running averages: the mean over ghost groups of each group's statistics.
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=0).reshape(C)
            ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=0).reshape(C)
        return mean, var


def make_norm(kind: str, *, groups: int = 32, momentum: float = 0.9, group_size: int = 0,
              epsilon: float = 1e-5, param_dtype: Any = jnp.float32,
              scale_init: Callable = nn.initializers.ones, name: str | None = None) -> Norm:
    """The norm `kind` names, configured.

    Args:
      kind: one of `KINDS`: batch | group | instance | layer | rms.
      groups, momentum, group_size, epsilon, param_dtype, scale_init: see `Norm`.
      name: the module's name in its parent.

    Example:
      ``make_norm("group", groups=8, name="norm1")(x_BHWC)``
    """
    if kind not in KINDS:
        raise ValueError(f"norm kind {kind!r} is not one of {', '.join(KINDS)}"
                         + did_you_mean(kind, list(KINDS)))
    return Norm(kind=kind, groups=groups, momentum=momentum, group_size=group_size,
                epsilon=epsilon, param_dtype=param_dtype, scale_init=scale_init, name=name)
