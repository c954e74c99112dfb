"""OptimConfig -> optax.GradientTransformation: schedule, clipping, weight-decay mask.

The optimizer is `clip_by_global_norm(clip_norm)` followed by the named optimizer, whose learning
rate follows the named schedule and whose decoupled weight decay skips every parameter whose
"/"-joined path matches one of `weight_decay_exclude` (by default norms' scales, biases and
embeddings).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxscale.config import ConfigError, OptimConfig
from jaxscale.core.dtypes import dtype
from jaxscale.core.trees import path_str


def _warmup(cfg: OptimConfig) -> optax.Schedule:
    return optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))


def _constant(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.constant_schedule(cfg.lr)


def _cosine(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)


def _linear(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_ratio, decay_steps)


def _wsd(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: hold lr, then decay linearly over the last fraction of the steps."""
    decay = max(int(round(decay_steps * cfg.wsd_decay_fraction)), 1)
    stable = max(decay_steps - decay, 0)
    return optax.join_schedules(
        [optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_ratio, decay)],
        [stable],
    )


# After warmup, each schedule runs over `decay_steps` steps.
SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "constant": _constant,
    "cosine": _cosine,
    "linear": _linear,
    "wsd": _wsd,
}


def make_schedule(cfg: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate as a function of the step: linear warmup, then the named schedule.

    Args:
      cfg: optimizer settings.
      total_steps: length of the run; the post-warmup schedule spans `cfg.decay_steps` steps, or
        the rest of the run when that is 0.
    """
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule={cfg.schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}"
        )
    decay_steps = cfg.decay_steps
    if decay_steps == 0 and cfg.schedule != "constant":
        if total_steps is None:
            raise ConfigError(
                "optim.decay_steps=0 needs the run's total steps to size the schedule"
            )
        decay_steps = max(total_steps - cfg.warmup_steps, 1)
    after = SCHEDULES[cfg.schedule](cfg, decay_steps)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([_warmup(cfg), after], [cfg.warmup_steps])


def decay_mask(patterns: tuple[str, ...]) -> Callable[[Any], Any]:
    """A mask function: True where a parameter's path matches none of `patterns`."""
    compiled = [re.compile(p) for p in patterns]

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(c.search(path_str(path)) for c in compiled), params
        )

    return mask


def _adamw(cfg: OptimConfig, lr: optax.Schedule, mask) -> optax.GradientTransformation:
    return optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask,
        mu_dtype=dtype(cfg.moment_dtype),
    )


def _lion(cfg: OptimConfig, lr: optax.Schedule, mask) -> optax.GradientTransformation:
    return optax.lion(
        lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask,
        mu_dtype=dtype(cfg.moment_dtype),
    )


def _adafactor(cfg: OptimConfig, lr: optax.Schedule, mask) -> optax.GradientTransformation:
    # optax.adafactor adds weight_decay_rate * param after its learning rate, so the decay would
    # not scale with lr (weight_decay=0.1 would shrink every weight by 10% a step). Scaling by
    # the learning rate last makes it decoupled decay as in adamw: p -= lr * (update + wd * p).
    return optax.chain(
        optax.adafactor(
            None, multiply_by_parameter_scale=False, momentum=cfg.b1 or None,
            dtype_momentum=dtype(cfg.moment_dtype),
            weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask,
        ),
        optax.scale_by_learning_rate(lr, flip_sign=False),
    )


def _sgd(cfg: OptimConfig, lr: optax.Schedule, mask) -> optax.GradientTransformation:
    """SGD (with momentum) and decoupled weight decay: p -= lr * (momentum_update + wd * p)."""
    momentum = (
        optax.trace(cfg.momentum, nesterov=cfg.nesterov,
                    accumulator_dtype=dtype(cfg.moment_dtype))
        if cfg.momentum else optax.identity()
    )
    return optax.chain(
        momentum,
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(lr),
    )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "lion": _lion,
    "adafactor": _adafactor,
    "sgd": _sgd,
}


def make_optimizer(
    cfg: OptimConfig, total_steps: int | None = None
) -> optax.GradientTransformation:
    """The optax transformation for `cfg`.

    Args:
      cfg: optimizer settings.
      total_steps: length of the run (sizes the schedule when `cfg.decay_steps` is 0).

    Example:
      >>> tx = make_optimizer(OptimConfig(name="adamw", lr=1e-3), total_steps=1000)
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(
            f"optim.name={cfg.name!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}"
        )
    optimizer = OPTIMIZERS[cfg.name](
        cfg, make_schedule(cfg, total_steps), decay_mask(tuple(cfg.weight_decay_exclude))
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optimizer)
    return optimizer
