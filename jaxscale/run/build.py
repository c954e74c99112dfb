"""One builder: config -> mesh -> rules -> task -> model adapter -> optimizer -> abstract state ->
shardings -> jitted steps.

    run = build(cfg)                        # or build(cfg, model=my_flax_model, task=my_task)
    state = run.init_state()                # born sharded
    state, metrics = run.train_step(state, batch, rng)

The training loop, `jaxscale inspect`, `jaxscale plan`, the benchmarks and the tests all get
their steps from here, so there is one wiring. The functions after `build` (`init_state`,
`make_train_step`, ...) are the same wiring for code that holds a model, an optimizer and a mesh
rather than a config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxscale.config import CHUNKED_VOCAB, Config, ConfigError, ModelConfig
from jaxscale.core import context, pipeline_step
from jaxscale.core import sharding as shd
from jaxscale.core import state as state_lib
from jaxscale.core import step as step_lib
from jaxscale.core.mesh import make_mesh
from jaxscale.core.optim import make_optimizer, make_schedule
from jaxscale.core.sharding.manual import spec_axes
from jaxscale.core.state import TrainState
from jaxscale.errors import ShardingError
from jaxscale.models import ModelAdapter, adapt, build_model
from jaxscale.tasks import (
    Task,
    abstract_batch,
    batch_axes,
    example_batch,
    make_task,
    objective,
    staged_objective,
)
from jaxscale.tasks.lm import LanguageModel


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run is made of, wired once (see `build`)."""

    cfg: Config
    mesh: Mesh
    rules: shd.LogicalRules
    task: Task
    model: ModelAdapter
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    variables_fn: state_lib.VariablesFn  # rng -> (boxed params, extra): the model's init
    abstract: TrainState  # shapes and dtypes of the state, parameters boxed with their names
    shardings: TrainState  # a NamedSharding per state leaf
    batch_spec: Mapping[str, Any]  # the task's fields of one global batch
    batch_shardings: dict[str, NamedSharding]
    train_step: Callable  # jitted (state, batch, rng) -> (state, metrics), state donated
    eval_fn: Callable  # pure (state, batch, sums) -> sums
    eval_step: Callable  # eval_fn jitted with the state's and the batch's shardings
    pipeline: pipeline_step.PipelineSpec | None = None  # how the layer stack is pipelined

    def init_state(self) -> TrainState:
        """A fresh state, every leaf born with its sharding."""
        state, _ = state_lib.init_state(self.variables_fn, self.tx, self.mesh, self.rules,
                                        seed=self.cfg.seed, shardings=self.shardings)
        return state

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of one global batch, with its shardings."""
        return abstract_batch(self.batch_spec, self.batch_shardings)

    def abstract_train_state(self) -> TrainState:
        """ShapeDtypeStructs of the (unboxed) state, with its shardings."""
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state_lib.unbox(self.abstract), self.shardings,
        )

    def lower(self, state: Any = None, batch: Any = None, rng: Any = None) -> Any:
        """The train step lowered for these arguments (abstract ones where not given)."""
        return self.train_step.lower(
            self.abstract_train_state() if state is None else state,
            self.abstract_batch() if batch is None else batch,
            jax.random.key(0) if rng is None else rng,
        )

    def flops_per_example(self) -> float | None:
        """Training FLOPs of one example by the task's formula for this model, else None (then
        XLA's cost analysis of the compiled step counts them: `analysis.metrics.compiled_stats`)."""
        return self.task.flops_per_example(self.model.config)


def build(cfg: Config, model: Any = None, task: Task | None = None, *,
          mesh: Mesh | None = None) -> Run:
    """Wire a run of `cfg`.

    Args:
      cfg: a validated Config (`config.load`).
      model: a Flax Linen module, an NNX module (or ``rngs -> module`` factory) or a
        ModelAdapter; default: the model `cfg.model` names. A model passed in is described by
        its own config only (FLOPs and MFU never come from `cfg.model` then).
      task: default: the task `cfg.task.name` names.
      mesh: default: `cfg.mesh` over all devices.

    Raises:
      ConfigError / ShardingError: a batch that does not split over its devices, an unknown
        logical name, an unmatched large parameter, an unused mesh axis, ... (before compiling).
    """
    mesh = mesh or make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding.rules, mesh)
    shd.check_rules(rules, mesh)
    task = task or make_task(cfg)
    if model is None:
        adapter = adapt(with_chunked_head(cfg, build_model(cfg.model)), config=cfg.model)
    else:
        adapter = adapt(with_chunked_head(cfg, model))
    spec = task.batch_spec(cfg.batch_size)
    axes = batch_axes(spec)
    batch_shardings = shd.batch_shardings(mesh, rules, axes)
    pipe = pipeline_spec(cfg, mesh, rules)
    check_batch(cfg, spec, batch_shardings, pipelined=pipe is not None)
    tx = make_optimizer(cfg.optim, cfg.steps)
    schedule = make_schedule(cfg.optim, cfg.steps)
    variables_fn = model_variables(
        adapter, task.model_inputs(example_batch(task)),
        param_rules=cfg.sharding.param_rules, replicate_below=cfg.sharding.replicate_below,
    )
    abstract = _abstract_state(variables_fn, tx, cfg.seed, adapter, task, spec)
    shardings = shd.state_shardings(abstract, mesh, rules, batch_names=_names(axes))
    grad_fn = None
    if pipe is None:
        loss = _sequence_layout(objective(task, adapter), adapter.config, mesh, rules, spec)
    else:
        staged = _staged(task, adapter, pipe)
        loss = pipeline_step.objective(staged, mesh, pipe)
        if pipe.schedule == "1f1b":
            grad_fn = pipeline_step.one_f_one_b(staged, mesh, pipe, batch_axes=axes)
    train_step = step_lib.jit_step(
        step_lib.make_train_step(
            loss, tx, grad_accum=cfg.optim.grad_accum, learning_rate_fn=schedule, mesh=mesh,
            rules=rules, batch_axes=axes, weight_name=task.unit, grad_fn=grad_fn,
        ),
        shardings, batch_shardings,
    )
    eval_fn = step_lib.make_eval_step(loss, mesh=mesh, rules=rules, batch_axes=axes)
    eval_step = step_lib.jit_eval_step(eval_fn, shardings, batch_shardings)
    return Run(cfg, mesh, rules, task, adapter, tx, schedule, variables_fn, abstract, shardings,
               spec, batch_shardings, train_step, eval_fn, eval_step, pipe)


def chunked_loss(cfg: Config, vocab_size: int) -> bool:
    """Whether the loss projects onto the vocabulary a chunk at a time (`loss.chunked`; auto:
    a language model with a vocabulary above CHUNKED_VOCAB)."""
    if cfg.loss.chunked != "auto":
        return cfg.loss.chunked == "always"
    return cfg.task.name == "lm" and vocab_size > CHUNKED_VOCAB


def with_chunked_head(cfg: Config, model: Any) -> Any:
    """`model`, or under `chunked_loss` the built-in decoder returning `HeadInputs` (its
    hidden states and vocabulary projection) in place of the logits.

    Raises:
      ConfigError: loss.chunked=always for a model that returns its own outputs, or a task other
        than the language model.
    """
    decoder = hasattr(model, "hidden_head") and cfg.task.name == "lm"
    if cfg.loss.chunked == "always" and not decoder:
        raise ConfigError(f"loss.chunked=always needs the built-in decoder and task.name=lm (the "
                          f"decoder can return its hidden states and vocabulary projection); "
                          f"{type(model).__name__} with task.name={cfg.task.name} computes its "
                          f"own outputs. Set loss.chunked=never")
    if decoder and chunked_loss(cfg, model.cfg.vocab_size):
        return model.clone(hidden_head=True)
    return model


def pipeline_spec(cfg: Config, mesh: Mesh,
                  rules: shd.LogicalRules) -> pipeline_step.PipelineSpec | None:
    """How the step pipelines the layer stack: over the mesh axis the rules split the stack's
    "layers" dimension over, with `cfg.pipeline`'s schedule; None when no axis of size > 1
    splits it.

    Raises:
      ConfigError: the stack split over more than one mesh axis.
    """
    axes = spec_axes(("layers",), rules, mesh)[0]
    if not axes:
        return None
    if len(axes) > 1:
        raise ConfigError(
            f"the sharding rules split the layer stack ('layers') over mesh axes "
            f"{', '.join(axes)}; pipeline stages run over one axis"
        )
    p = cfg.pipeline
    return pipeline_step.PipelineSpec(p.schedule, p.microbatches, p.virtual_stages, axes[0],
                                      mesh.shape[axes[0]])


def _staged(task: Task, adapter: ModelAdapter,
            pipe: pipeline_step.PipelineSpec) -> pipeline_step.StagedObjective:
    """The task's objective over the model's stages, or a one-line error for a model that does
    not split."""
    try:
        staged = staged_objective(task, adapter)
    except ValueError as e:
        raise ConfigError(f"mesh.{pipe.stage_axis}={pipe.stages}: {e}") from None
    if staged is None:
        obj = getattr(adapter, "module", getattr(adapter, "model", adapter))
        raise ConfigError(
            f"mesh.{pipe.stage_axis}={pipe.stages} splits the layer stack into pipeline stages, "
            f"but model {type(obj).__name__!r} does not split (give it a pipeline_stages() "
            f"method returning jaxscale.models.Stages); set mesh.{pipe.stage_axis}=1"
        )
    return staged


def _sequence_layout(loss: Callable, model_cfg: Any, mesh: Mesh, rules: shd.LogicalRules,
                     spec: Mapping[str, Any]) -> Callable:
    """`loss` on batches in the load-balanced ring layout when the decoder's config asks for it.

    Every batch field whose second dimension is "length" is taken in `context.balanced_order`
    for the sequence axis' size (and "positions", if the batch lacks them, filled with the global
    ones first), so causal work is the same on every sequence shard. A per-token loss is a sum
    over tokens: the order does not change it.
    """
    if not (isinstance(model_cfg, ModelConfig) and model_cfg.context_parallel == "ring"
            and model_cfg.context_load_balance):
        return loss
    length_axes = spec_axes(("batch", "length"), rules, mesh)[1]
    shards = math.prod(mesh.shape[a] for a in length_axes)
    fields = [k for k, f in spec.items() if f.logical[1:2] == ("length",)]
    if shards == 1 or not fields:
        return loss
    seq_len = spec[fields[0]].shape[1]
    order = context.balanced_order(seq_len, shards)

    def reordered(params, extra, batch, rng, train):
        batch = dict(batch)
        if "positions" in spec and "positions" not in batch:
            rows = batch[fields[0]].shape[0]
            batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                 (rows, seq_len))
        for key in fields:
            if key in batch:
                batch[key] = batch[key][:, order]
        return loss(params, extra, batch, rng, train)

    return reordered


def _abstract_state(variables_fn, tx, seed, adapter, task, spec) -> TrainState:
    """The abstract state; a model that cannot take the task's inputs is a one-line error."""
    try:
        return state_lib.abstract_state(variables_fn, tx, seed)
    except (ConfigError, ShardingError):  # already one line about the model or its names
        raise
    except (ValueError, TypeError) as e:
        obj = getattr(adapter, "module", getattr(adapter, "model", adapter))
        model = getattr(getattr(adapter, "config", None), "name", None) or getattr(
            obj, "__name__", type(obj).__name__)
        fields = ", ".join(f"{k} {list(f.shape[1:])} {np.dtype(f.dtype).name}"
                           for k, f in spec.items())
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"model {model!r} cannot be initialised on the {task.name} task's examples "
            f"({fields}): {type(e).__name__}: {reason}"
        ) from None


def _names(axes: Mapping[str, tuple]) -> tuple[str, ...]:
    return tuple(sorted({n for names in axes.values() for n in names if n is not None}))


def check_batch(cfg: Config, spec: Mapping[str, Any],
                shardings: Mapping[str, NamedSharding], *, pipelined: bool = False) -> None:
    """Every batch field (and each microbatch: of `optim.grad_accum`, or of
    `pipeline.microbatches` when `pipelined`) must split evenly over the devices that shard it.

    Raises:
      ConfigError: naming batch_size (or the microbatch) and the mesh axes, or the field's
        dimension.
    """
    for key, field in spec.items():
        mesh, partition = shardings[key].mesh, shardings[key].spec
        for dim, (size, target) in enumerate(zip(field.shape, partition, strict=False)):
            axes = shd.axes_of(target)
            parts = math.prod(mesh.shape[a] for a in axes)
            if dim == 0:
                key, num = "optim.grad_accum", cfg.optim.grad_accum
                if pipelined:
                    key, num = "pipeline.microbatches", cfg.pipeline.microbatches
                micro = cfg.batch_size // num
                if micro % parts:
                    sizes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
                    what = (f"batch_size={cfg.batch_size}" if num == 1 else
                            f"the microbatch (batch_size={cfg.batch_size} / {key}="
                            f"{num} = {micro})")
                    raise ConfigError(f"{what} is not divisible by the {parts} devices that shard "
                                      f"the batch ({sizes})")
            elif size % parts:
                where = " x ".join(f"mesh.{a}" for a in axes)
                raise ConfigError(
                    f"{_dim_name(field.logical[dim], size)} is not divisible by the {parts} "
                    f"devices that shard the {field.logical[dim]} dimension of batch field "
                    f"{key!r} ({where})"
                )


def _dim_name(logical: str | None, size: int) -> str:
    # The language-model task's length is the config's seq_len: name the setting to change.
    return f"seq_len={size}" if logical == "length" else f"a batch dimension of size {size}"


# --------------------------------------------------------------------------------------------
# The same wiring from a model, an optimizer and a mesh.


def model_variables(model: Any, inputs: Mapping[str, Any], *, param_rules: Any = (),
                    replicate_below: int = 1 << 20) -> state_lib.VariablesFn:
    """``rng -> (params, extra)`` of `model` initialised on `inputs`, every parameter boxed
    with its logical names (its own annotations, else the first matching `param_rules`)."""
    adapter = adapt(model)
    hint = getattr(adapter, "hint", "; or annotate it with nn.with_logical_partitioning")

    def variables_fn(rng):
        params, extra = adapter.init(rng, inputs)
        return shd.annotate_params(params, param_rules, replicate_below, hint=hint), extra

    return variables_fn


def _lm_inputs(seq_len: int) -> dict[str, Any]:
    task = LanguageModel(seq_len)
    return task.model_inputs(example_batch(task))


def init_state(model: Any, tx: optax.GradientTransformation, mesh: Mesh,
               rules: shd.LogicalRules, *, seq_len: int | None = None,
               inputs: Mapping[str, Any] | None = None, seed: int = 0,
               param_rules: Any = ()) -> tuple[TrainState, TrainState]:
    """A sharded TrainState of `model`, initialised on example `inputs` (model inputs by role)
    or, for a token model, on ``seq_len`` tokens. Returns (state, shardings)."""
    fn = model_variables(model, _lm_inputs(seq_len) if inputs is None else inputs,
                         param_rules=param_rules)
    return state_lib.init_state(fn, tx, mesh, rules, seed=seed)


def abstract_state(model: Any, tx: optax.GradientTransformation, seq_len: int | None = None,
                   seed: int = 0, *, inputs: Mapping[str, Any] | None = None,
                   param_rules: Any = ()) -> TrainState:
    """Shapes and dtypes of `model`'s boxed state (see `init_state`); nothing is allocated."""
    fn = model_variables(model, _lm_inputs(seq_len) if inputs is None else inputs,
                         param_rules=param_rules)
    return state_lib.abstract_state(fn, tx, seed)


def make_train_step(model: Any, tx: optax.GradientTransformation, *, task: Task | None = None,
                    z_loss: float = 0.0, grad_accum: int = 1,
                    learning_rate_fn: optax.Schedule | None = None, mesh: Mesh | None = None,
                    rules: shd.LogicalRules = ()) -> Callable:
    """The pure train step of `model` on `task` (default: next-token prediction with `z_loss`).
    See `jaxscale.core.step.make_train_step`; jit it with `jit_step`."""
    task = task or LanguageModel(seq_len=0, z_loss=z_loss)
    return step_lib.make_train_step(
        objective(task, adapt(model)), tx, grad_accum=grad_accum,
        learning_rate_fn=learning_rate_fn, mesh=mesh, rules=rules,
        batch_axes=batch_axes(task.batch_spec(1)), weight_name=task.unit,
    )


def make_eval_step(model: Any, *, task: Task | None = None, mesh: Mesh | None = None,
                   rules: shd.LogicalRules = ()) -> Callable:
    """The pure evaluation step of `model` on `task` (see `jaxscale.core.step.make_eval_step`)."""
    task = task or LanguageModel(seq_len=0)
    return step_lib.make_eval_step(objective(task, adapt(model)), mesh=mesh, rules=rules,
                                   batch_axes=batch_axes(task.batch_spec(1)))

