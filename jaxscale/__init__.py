"""jaxscale: train Flax models sharded over a device mesh.

The public API, re-exported here. Names resolve on first use, so `import jaxscale` (and the
CLI) stays light until jax is needed; that is what lets `--cpu-devices` take effect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "jaxscale.config",
    "ConfigError": "jaxscale.errors",
    "ShardingError": "jaxscale.errors",
    "NonFiniteError": "jaxscale.errors",
    "CheckpointError": "jaxscale.errors",
    "Preempted": "jaxscale.errors",
    "Checkpointer": "jaxscale.checkpoint",
    "MeshConfig": "jaxscale.config",
    "ModelConfig": "jaxscale.config",
    "OptimConfig": "jaxscale.config",
    "make_mesh": "jaxscale.mesh",
    "LogicalRules": "jaxscale.sharding",
    "RULE_PRESETS": "jaxscale.sharding",
    "resolve_rules": "jaxscale.sharding",
    "state_shardings": "jaxscale.sharding",
    "batch_sharding": "jaxscale.sharding",
    "constrain": "jaxscale.sharding",
    "sharding_report": "jaxscale.sharding",
    "format_report": "jaxscale.sharding",
    "make_optimizer": "jaxscale.optim",
    "make_schedule": "jaxscale.optim",
    "TrainState": "jaxscale.state",
    "init_state": "jaxscale.state",
    "abstract_state": "jaxscale.state",
    "make_train_step": "jaxscale.step",
    "make_eval_step": "jaxscale.step",
    "jit_step": "jaxscale.step",
    "lm_loss": "jaxscale.step",
    "LossOutput": "jaxscale.step",
    "build_model": "jaxscale.models",
    "train": "jaxscale.trainer",
}
_SUBMODULES = {"config", "mesh", "sharding", "remat", "optim", "state", "step", "models", "data",
               "metrics", "trainer", "cli", "plot", "errors", "distributed", "watchdog",
               "checkpoint", "preemption"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxscale.{name}")
    raise AttributeError(f"module 'jaxscale' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from jaxscale.checkpoint import Checkpointer  # noqa: F401
    from jaxscale.config import Config, MeshConfig, ModelConfig, OptimConfig  # noqa: F401
    from jaxscale.errors import (  # noqa: F401
        CheckpointError,
        ConfigError,
        NonFiniteError,
        Preempted,
        ShardingError,
    )
    from jaxscale.mesh import make_mesh  # noqa: F401
    from jaxscale.models import build_model  # noqa: F401
    from jaxscale.optim import make_optimizer, make_schedule  # noqa: F401
    from jaxscale.sharding import (  # noqa: F401
        RULE_PRESETS,
        LogicalRules,
        batch_sharding,
        constrain,
        format_report,
        resolve_rules,
        sharding_report,
        state_shardings,
    )
    from jaxscale.state import TrainState, abstract_state, init_state  # noqa: F401
    from jaxscale.step import LossOutput, jit_step, lm_loss, make_eval_step, make_train_step  # noqa: F401
    from jaxscale.trainer import train  # noqa: F401
