"""The train step's pipeline wrapper: a staged objective, its microbatches, a schedule.

With the layer stack split over a stage axis, the step's gradient function is one of these
instead of `step.microbatched(step.gradient(...))`; the rest of the step (mean gradients, the
guarded update, the metrics) is the same, so a pipelined step reports what an unpipelined one
does (loss, grad norm, tokens) and its parameter tree is the same logical tree.

  gpipe, circular  `objective` runs the embedding on the whole batch, the stack through
                   `pipeline.forward` (M microbatches, V chunks per stage) and the head on the
                   whole batch again; `step.gradient` differentiates it (autodiff through the
                   pipelined forward). Evaluation uses the same forward for every schedule.
  1f1b             `gradient` runs the hand-scheduled loop (`pipeline.run`) with the head and
                   the loss on the last stage, then the embedding's backward.

The stack's chunks: layer stack [L, ...] -> [S, V, L/(S*V), ...], chunk v*S + s on stage s.
Sharded over the stage axis in blocks, [S, 1, L/S] is a view of the stack as it is stored; with
V > 1 the circular order needs a different layout, which the compiler moves into place (an
all-to-all of the stack over the stage axis each step, forward and backward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxscale.core import pipeline
from jaxscale.core.step import GradFn, LossOutput, Objective, constrain_batch, split_microbatches


class StagedObjective(NamedTuple):
    """An objective in three parts over one parameter tree (`jaxscale.tasks.staged_objective`).

    Attributes:
      key: the top-level parameter holding the layer stack (every leaf [layers, ...]).
      embed: ``(params, batch, rng, train) -> x``: the first stage's input.
      stage: ``(stack params [n, ...], x, batch, rng, train) -> x``: n layers.
      head: ``(params, x, batch) -> LossOutput``: the loss sums of the last stage's output.
      head_keys: the top-level parameters `head` reads.
    """

    key: str
    embed: Callable
    stage: Callable
    head: Callable
    head_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """How the step pipelines: the schedule, M, V and the mesh axis of the stages."""

    schedule: str
    microbatches: int
    virtual_stages: int
    stage_axis: str
    stages: int

    def table(self) -> pipeline.Timetable:
        """The timetable a training step runs (`pipeline.schedule_timetable`)."""
        return pipeline.schedule_timetable(self.schedule, self.stages, self.microbatches,
                                           self.virtual_stages)

    def forward_table(self) -> pipeline.Timetable:
        """The forward-only timetable of evaluation (and of gpipe and circular training)."""
        schedule = "circular" if self.schedule == "circular" else "gpipe"
        return pipeline.forward_timetable(schedule, self.stages, self.microbatches,
                                          self.virtual_stages)


def to_chunks(stack: Any, stages: int, virtual: int) -> Any:
    """Leaves [L, ...] -> [S, V, L/(S*V), ...]: chunk v*S + s (layers in order) on stage s."""
    def split(p):
        p = p.reshape(virtual, stages, p.shape[0] // (stages * virtual), *p.shape[1:])
        return jnp.swapaxes(p, 0, 1)

    return jax.tree.map(split, stack)


def from_chunks(chunks: Any) -> Any:
    """The inverse of `to_chunks`."""
    def join(p):
        p = jnp.swapaxes(p, 0, 1)
        return p.reshape(p.shape[0] * p.shape[1] * p.shape[2], *p.shape[3:])

    return jax.tree.map(join, chunks)


def join_microbatches(x_M: jax.Array) -> jax.Array:
    """[M, B/M, ...] -> [B, ...]: the inverse of `step.split_microbatches`."""
    x = jnp.swapaxes(x_M, 0, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _keys(rng: Any, num: int) -> jax.Array:
    """One RNG key per microbatch as raw key data (what crosses the shard_map boundary)."""
    if rng is None:
        return jnp.zeros((num,), jnp.int32)
    return jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(rng, i)))(jnp.arange(num))


def _stage_fn(staged: StagedObjective, rng: Any, train: bool) -> pipeline.StageFn:
    def fn(params, x, extras, microbatch, chunk):
        batch, key = extras
        chunk_rng = None if rng is None else jax.random.fold_in(
            jax.random.wrap_key_data(key), chunk)
        return staged.stage(params, x, batch, chunk_rng, train)

    return fn


def objective(staged: StagedObjective, mesh: Mesh, spec: PipelineSpec) -> Objective:
    """The objective with the stack run through the forward-only pipeline (see the module
    docstring): what gpipe and circular train by autodiff, and what evaluation runs."""
    table = spec.forward_table()

    def fn(params, extra, batch, rng, train):
        x = staged.embed(params, batch, rng, train)
        M = spec.microbatches
        extras_M = (split_microbatches(batch, M), _keys(rng, M))
        chunks = to_chunks(params[staged.key], spec.stages, spec.virtual_stages)
        y_M = pipeline.forward(_stage_fn(staged, rng, train), chunks,
                               split_microbatches(x, M), extras_M, table, mesh=mesh,
                               stage_axis=spec.stage_axis)
        return staged.head(params, join_microbatches(y_M), batch), extra

    return fn


def one_f_one_b(staged: StagedObjective, mesh: Mesh, spec: PipelineSpec,
                batch_axes: Any = None) -> GradFn:
    """The 1f1b gradient: the embedding forward, the hand-scheduled loop (stages, head and loss
    on the last stage), the embedding backward; float32 gradient sums as `step.gradient`'s.
    `batch_axes` names the batch fields' dimensions (see `step.constrain_batch`)."""
    table = spec.table()

    def fn(params, extra, batch, rng):
        M = spec.microbatches
        batch = constrain_batch(batch, batch_axes)
        x, embed_vjp = jax.vjp(lambda p: staged.embed(p, batch, rng, True), params)
        extras_M = (split_microbatches(batch, M), _keys(rng, M))
        stack = jax.tree.map(lambda p: p[:, 0], to_chunks(params[staged.key], spec.stages, 1))
        head_params = {k: params[k] for k in staged.head_keys}

        def loss_fn(head_params, y, extras):
            out = staged.head(head_params, y, extras[0])
            return out.objective, (out.weight, out.sums)

        loss, (weight, sums), d_stack, d_head, d_x_M = pipeline.run(
            _stage_fn(staged, rng, True), loss_fn, stack, head_params,
            split_microbatches(x, M), extras_M, table, mesh=mesh,
            stage_axis=spec.stage_axis, has_aux=True)
        (grads,) = embed_vjp(join_microbatches(d_x_M))
        grads = dict(grads)
        grads[staged.key] = from_chunks(jax.tree.map(lambda g: g[:, None], d_stack))
        for k, g in d_head.items():
            grads[k] = jax.tree.map(jnp.add, grads[k], g)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return grads, LossOutput(loss, weight, sums), extra

    return fn
