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
    "Checkpointer": "jaxscale.checkpoint.manager",
    "MeshConfig": "jaxscale.config",
    "ModelConfig": "jaxscale.config",
    "OptimConfig": "jaxscale.config",
    "make_mesh": "jaxscale.core.mesh",
    "LogicalRules": "jaxscale.core.sharding",
    "RULE_PRESETS": "jaxscale.core.sharding",
    "resolve_rules": "jaxscale.core.sharding",
    "state_shardings": "jaxscale.core.sharding",
    "batch_sharding": "jaxscale.core.sharding",
    "constrain": "jaxscale.core.sharding",
    "sharding_report": "jaxscale.core.sharding",
    "format_report": "jaxscale.core.sharding",
    "make_optimizer": "jaxscale.core.optim",
    "make_schedule": "jaxscale.core.optim",
    "TrainState": "jaxscale.core.state",
    "init_state": "jaxscale.run.build",
    "abstract_state": "jaxscale.run.build",
    "make_train_step": "jaxscale.run.build",
    "make_eval_step": "jaxscale.run.build",
    "jit_step": "jaxscale.core.step",
    "lm_loss": "jaxscale.tasks.lm",
    "LossOutput": "jaxscale.core.step",
    "build_model": "jaxscale.models",
    "adapt": "jaxscale.models",
    "LinenAdapter": "jaxscale.models.linen",
    "NnxAdapter": "jaxscale.models.nnx",
    "ModelAdapter": "jaxscale.models.adapter",
    "Task": "jaxscale.tasks.base",
    "Field": "jaxscale.tasks.base",
    "LanguageModel": "jaxscale.tasks.lm",
    "Classify": "jaxscale.tasks.classify",
    "make_task": "jaxscale.tasks",
    "build": "jaxscale.run.build",
    "Run": "jaxscale.run.build",
    "TaskConfig": "jaxscale.config",
    "ShardingConfig": "jaxscale.config",
    "train": "jaxscale.run.loop",
}
# `jaxscale.<name>` -> the module it names (the flat names of earlier versions included)
_SUBMODULES = {
    "config": "jaxscale.config", "errors": "jaxscale.errors", "cli": "jaxscale.cli",
    "core": "jaxscale.core", "tasks": "jaxscale.tasks", "models": "jaxscale.models",
    "data": "jaxscale.data", "checkpoint": "jaxscale.checkpoint", "run": "jaxscale.run",
    "analysis": "jaxscale.analysis",
    "mesh": "jaxscale.core.mesh", "sharding": "jaxscale.core.sharding",
    "remat": "jaxscale.core.remat", "optim": "jaxscale.core.optim",
    "state": "jaxscale.core.state", "step": "jaxscale.core.step",
    "metrics": "jaxscale.analysis.metrics", "plot": "jaxscale.analysis.plot",
    "trainer": "jaxscale.run.loop", "distributed": "jaxscale.run.distributed",
    "watchdog": "jaxscale.run.watchdog", "preemption": "jaxscale.run.preemption",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'jaxscale' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from jaxscale.checkpoint.manager import Checkpointer  # noqa: F401
    from jaxscale.config import Config, MeshConfig, ModelConfig, OptimConfig  # noqa: F401
    from jaxscale.core.mesh import make_mesh  # noqa: F401
    from jaxscale.core.optim import make_optimizer, make_schedule  # noqa: F401
    from jaxscale.core.sharding import (  # noqa: F401
        RULE_PRESETS,
        LogicalRules,
        batch_sharding,
        constrain,
        format_report,
        resolve_rules,
        sharding_report,
        state_shardings,
    )
    from jaxscale.core.state import TrainState, abstract_state, init_state  # noqa: F401
    from jaxscale.core.step import LossOutput, jit_step, lm_loss, make_eval_step, make_train_step  # noqa: F401
    from jaxscale.errors import (  # noqa: F401
        CheckpointError,
        ConfigError,
        NonFiniteError,
        Preempted,
        ShardingError,
    )
    from jaxscale.models import build_model  # noqa: F401
    from jaxscale.run.loop import train  # noqa: F401
