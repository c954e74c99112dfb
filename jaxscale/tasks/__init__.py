"""Tasks: what is specific to a kind of training (see `jaxscale.tasks.base.Task`).

    task = make_task(cfg)                      # task.name: lm | classify
    loss_fn = objective(task, model_adapter)   # what the train step differentiates

Register a task of your own with `register(name, from_config)`; ``task.name=<name>`` then picks
it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxscale.core.pipeline_step import StagedObjective
from jaxscale.core.step import LossOutput, Objective
from jaxscale.errors import ConfigError
from jaxscale.tasks import classify, lm
from jaxscale.tasks.base import BatchSpec, Field, Task, abstract_batch, batch_axes, example_batch
from jaxscale.validation import TASKS as _TASK_NAMES
from jaxscale.validation import did_you_mean

# task.name -> function(cfg) -> Task
TASKS: dict[str, Callable[[Any], Task]] = {
    "lm": lm.from_config,
    "classify": classify.from_config,
}


def register(name: str, from_config: Callable[[Any], Task]) -> None:
    """Make ``task.name=<name>`` build `from_config(cfg)`."""
    TASKS[name] = from_config
    if name not in _TASK_NAMES:
        _TASK_NAMES.append(name)


def make_task(cfg: Any) -> Task:
    """The task `cfg.task.name` names."""
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(
            f"task.name={name!r} is not a registered task; choose one of: {', '.join(TASKS)}"
            + did_you_mean(name, list(TASKS))
        )
    return TASKS[name](cfg)


def objective(task: Task, model: Any) -> Objective:
    """The objective the train step differentiates: `task.loss` of the model's outputs.

    Auxiliary losses the model returns (e.g. a mixture-of-experts load-balancing loss) are
    added to the objective as means per counted unit, and reported under their names with
    the model's auxiliary metrics.
    """

    def fn(params, extra, batch, rng, train):
        applied = model.apply(params, extra, task.model_inputs(batch), rng=rng, train=train)
        out = task.loss(applied.outputs, batch)
        if not (applied.aux_losses or applied.aux_metrics):
            return out, applied.extra
        aux = sum(applied.aux_losses.values())
        sums = dict(out.sums)
        for name, value in {**applied.aux_losses, **applied.aux_metrics}.items():
            sums[name] = value * out.weight  # reported as value (sums are divided by weight)
        return LossOutput(out.objective + aux * out.weight, out.weight, sums), applied.extra

    return fn


def staged_objective(task: Task, model: Any) -> StagedObjective | None:
    """The objective in pipeline stages (`core.pipeline_step.StagedObjective`): the model's
    embedding, layer runs and head (its adapter's ``stages()``), the task's loss on the head's
    outputs; None for a model that does not split."""
    split = getattr(model, "stages", None)
    stages = split() if split is not None else None
    if stages is None:
        return None

    def embed(params, batch, rng, train):
        return stages.embed(params, task.model_inputs(batch), rng, train)

    def stage(stack, x, batch, rng, train):
        return stages.layers(stack, x, task.model_inputs(batch), rng, train)

    def head(params, x, batch):
        return task.loss(stages.head(params, x, task.model_inputs(batch)), batch)

    return StagedObjective(stages.key, embed, stage, head, stages.head_keys)


__all__ = ["TASKS", "BatchSpec", "Field", "Task", "abstract_batch", "batch_axes",
           "example_batch", "make_task", "objective", "register", "staged_objective"]
