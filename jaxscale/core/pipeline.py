"""Pipeline parallelism: timetables of microbatches over stages, and the loops that run them.

A layer stack split into S stages (and, for the circular schedule, V virtual stages per stage:
S*V chunks, chunk c = v*S + s on stage s) runs M microbatches through them. A *timetable* says,
for every tick and stage, which microbatch (and which of the stage's chunks) that stage runs
forward (F), backward (B) or neither (idle). One simulator builds every schedule from the order in
which each stage wants its work, running an operation at the first tick its input exists:

  gpipe     every stage: F(0..M-1), then B(0..M-1): all forwards, then all backwards.
  circular  microbatches in groups of S; per group every chunk v in turn: F(group, v). A
            microbatch passes every stage V times, so the bubble shrinks to (S-1)/(V*M+S-1).
  1f1b      stage s: S-1-s warm-up forwards, then one forward and one backward in turn, then the
            remaining backwards; at most S stage inputs are kept per stage.

Two loops execute timetables, both under `shard_map` over the stage axis only (the other mesh
axes stay with the compiler, so fsdp and tensor parallelism inside a stage work as without
pipelining), one `lax.scan` step per tick, activations moving one stage on with `ppermute`:

  `forward`  a forward-only timetable (gpipe, circular) returning the last chunk's outputs; it is
             differentiable, so gpipe and circular train by autodiff through it (the stage
             function's remat policy decides what each tick keeps for the backward).
  `run`      a forward-and-backward timetable (1f1b, or gpipe's F+B table): a forward keeps only
             the stage's input, a backward recomputes the stage under `jax.vjp` and accumulates
             its parameter gradients, so a stage's live activations are the microbatches its table
             holds in flight (`Timetable.in_flight`): S for 1f1b, M for gpipe.

With F and B ticks of equal length every schedule idles (S-1)/(V*M+S-1) of the stage-ticks (the
bubble, `bubble_formula`); `Timetable.bubble_fraction` counts the idle slots of the table itself.
No mesh axis is named here: the caller passes the stage axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxscale.config import PIPELINE_SCHEDULES
from jaxscale.core.sharding.manual import shard_map
from jaxscale.validation import check_schedule as _check_settings

IDLE, FORWARD, BACKWARD = 0, 1, 2
SCHEDULES = PIPELINE_SCHEDULES  # what `pipeline.schedule` may name: gpipe, circular, 1f1b
LOOP_SCHEDULES = ("gpipe", "1f1b")  # forward-and-backward timetables `run` executes
FORWARD_SCHEDULES = ("gpipe", "circular")  # forward-only timetables `forward` executes

StageFn = Callable[..., jax.Array]
"""``stage_fn(params of one chunk, x, extras of the microbatch, microbatch, chunk) -> y``, y
shaped like x; `microbatch` and `chunk` are traced int32 indices (for per-layer RNG streams)."""


@dataclasses.dataclass(frozen=True)
class Timetable:
    """Which operation each stage does at each tick.

    Attributes:
      schedule: the schedule's name.
      code: [ticks, stages] IDLE, FORWARD or BACKWARD.
      microbatch: [ticks, stages] the microbatch of that operation (0 where idle).
      virtual: [ticks, stages] which of the stage's chunks it runs (0 where idle, and always 0
        with one chunk per stage).
    """

    schedule: str
    code: np.ndarray
    microbatch: np.ndarray
    virtual: np.ndarray | None = None

    def __post_init__(self):
        if self.virtual is None:
            object.__setattr__(self, "virtual", np.zeros_like(self.code))

    @property
    def stages(self) -> int:
        return self.code.shape[1]

    @property
    def virtual_stages(self) -> int:
        return int(self.virtual.max()) + 1

    @property
    def microbatches(self) -> int:
        return int(np.sum(self.code[:, 0] == FORWARD)) // self.virtual_stages

    @property
    def ticks(self) -> int:
        return self.code.shape[0]

    @property
    def has_backward(self) -> bool:
        return bool(np.any(self.code == BACKWARD))

    @property
    def idle_slots(self) -> int:
        """Stage-ticks with nothing to do, counted in the table."""
        return int(np.sum(self.code == IDLE))

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks (F and B ticks of equal length; a forward-only
        table's backward, by autodiff, mirrors it)."""
        return self.idle_slots / self.code.size

    @property
    def in_flight(self) -> int:
        """The most chunk inputs a stage holds at once (forward done, backward not yet): what
        bounds a stage's live activations. A forward-only table's backward runs after its last
        tick, so every forward it holds is in flight then."""
        most = 0
        for s in range(self.stages):
            live = np.cumsum(np.where(self.code[:, s] == FORWARD, 1,
                                      np.where(self.code[:, s] == BACKWARD, -1, 0)))
            most = max(most, int(live.max(initial=0)))
        return most


def bubble_formula(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """(S - 1) / (V*M + S - 1): the idle share of every schedule with equal F and B ticks."""
    return (stages - 1) / (virtual_stages * microbatches + stages - 1)


def check_schedule(schedule: str, stages: int, microbatches: int, virtual_stages: int = 1) -> None:
    """A known schedule whose demands the microbatches and virtual stages meet.

    Raises:
      ValueError: an unknown schedule, or see `jaxscale.validation.check_schedule`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline.schedule={schedule!r} is not one of: {', '.join(SCHEDULES)}")
    _check_settings(schedule, stages, microbatches, virtual_stages)


Op = tuple[int, int, int]  # (FORWARD | BACKWARD, microbatch, chunk on this stage)


def _order(schedule: str, stages: int, microbatches: int, virtual: int, s: int,
           backward: bool) -> list[Op]:
    """The operations stage `s` wants, in order."""
    M, S = microbatches, stages
    if schedule == "circular":
        ops = [(FORWARD, g + i, v) for g in range(0, M, S) for v in range(virtual)
               for i in range(S)]
        if backward:
            ops += [(BACKWARD, g + i, v) for g in range(0, M, S)
                    for v in reversed(range(virtual)) for i in range(S)]
        return ops
    forwards = [(FORWARD, m, 0) for m in range(M)]
    if schedule == "gpipe" or not backward:
        return forwards + ([(BACKWARD, m, 0) for m in range(M)] if backward else [])
    warmup = min(S - 1 - s, M)
    ops = [(FORWARD, m, 0) for m in range(warmup)]
    for m in range(M - warmup):
        ops += [(FORWARD, warmup + m, 0), (BACKWARD, m, 0)]
    return ops + [(BACKWARD, m, 0) for m in range(M - warmup, M)]


def _needs(op: Op, s: int, S: int, V: int) -> tuple[int, int, int, int] | None:
    """The (code, microbatch, chunk, stage) whose result `op` on stage `s` reads, None for the
    first chunk's forward (it reads the pipeline's input)."""
    code, m, v = op
    if code == FORWARD:
        if s > 0:
            return (FORWARD, m, v, s - 1)
        return (FORWARD, m, v - 1, S - 1) if v > 0 else None
    if s < S - 1:
        return (BACKWARD, m, v, s + 1)
    return (BACKWARD, m, v + 1, 0) if v < V - 1 else (FORWARD, m, v, s)


def _simulate(schedule: str, S: int, M: int, V: int, backward: bool) -> Timetable:
    orders = [_order(schedule, S, M, V, s, backward) for s in range(S)]
    done: dict[tuple[int, int, int, int], int] = {}  # (code, microbatch, chunk, stage) -> tick
    nxt = [0] * S
    rows: list[list[Op]] = []
    t = 0
    while any(nxt[s] < len(orders[s]) for s in range(S)):
        row: list[Op] = [(IDLE, 0, 0)] * S
        for s in range(S):
            if nxt[s] < len(orders[s]):
                need = _needs(orders[s][nxt[s]], s, S, V)
                if need is None or done.get(need, t) < t:
                    row[s] = orders[s][nxt[s]]
        for s, (code, m, v) in enumerate(row):
            if code != IDLE:
                done[(code, m, v, s)] = t
                nxt[s] += 1
        rows.append(row)
        t += 1
    table = np.array(rows, np.int32)  # [ticks, stages, 3]
    return Timetable(schedule, table[..., 0], table[..., 1], table[..., 2])


def timetable(schedule: str, stages: int, microbatches: int) -> Timetable:
    """The forward-and-backward timetable of gpipe or 1f1b (what `run` executes): each stage runs
    its next operation at the first tick whose input was produced at an earlier tick (F(m) on s
    needs F(m) on s-1; B(m) on s needs B(m) on s+1, or its own F(m) on the last stage).

    Raises:
      ValueError: a schedule `run` cannot execute, or fewer microbatches than stages for 1f1b.
    """
    if schedule not in LOOP_SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of: "
                         f"{', '.join(LOOP_SCHEDULES)}")
    check_schedule(schedule, stages, microbatches)
    return _simulate(schedule, stages, microbatches, 1, backward=True)


def forward_timetable(schedule: str, stages: int, microbatches: int,
                      virtual_stages: int = 1) -> Timetable:
    """The forward-only timetable of gpipe or circular (what `forward` executes; the backward is
    its mirror, by autodiff).

    Raises:
      ValueError: see `check_schedule`; a schedule with a hand-written backward (1f1b).
    """
    if schedule not in FORWARD_SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} has no forward-only timetable; choose "
                         f"one of: {', '.join(FORWARD_SCHEDULES)}")
    check_schedule(schedule, stages, microbatches, virtual_stages)
    return _simulate(schedule, stages, microbatches, virtual_stages, backward=False)


def schedule_timetable(schedule: str, stages: int, microbatches: int,
                       virtual_stages: int = 1) -> Timetable:
    """The timetable a training step of `schedule` runs: forward-only for gpipe and circular
    (trained by autodiff), forward-and-backward for 1f1b."""
    if schedule == "1f1b":
        check_schedule(schedule, stages, microbatches, virtual_stages)
        return timetable(schedule, stages, microbatches)
    return forward_timetable(schedule, stages, microbatches, virtual_stages)


# --------------------------------------------------------------------------------------------
# Buffers: which slot holds which waiting item.


def _live_intervals(table: Timetable) -> list[dict[str, list[tuple[int, int, int]]]]:
    """Per stage and buffer, (item, written at tick, read at tick) of what it holds, item =
    chunk * M + microbatch: an activation from the stage before (written at the end of the tick
    it was sent, read by this stage's forward), a stage input (forward to backward), a gradient
    from the stage after (sent, or the last chunk's own forward, to the backward)."""
    when = {(int(table.code[t, s]), int(table.microbatch[t, s]), int(table.virtual[t, s]), s): t
            for t in range(table.ticks) for s in range(table.stages)
            if table.code[t, s] != IDLE}
    S, M, V = table.stages, table.microbatches, table.virtual_stages
    out = []
    for s in range(S):
        live: dict[str, list[tuple[int, int, int]]] = {"inbox": [], "saved": [], "grad_in": []}
        for v in range(V):
            for m in range(M):
                item, f = v * M + m, when[(FORWARD, m, v, s)]
                need = _needs((FORWARD, m, v), s, S, V)
                if need is not None:
                    live["inbox"].append((item, when[need], f))
                if not table.has_backward:
                    continue
                b = when[(BACKWARD, m, v, s)]
                live["saved"].append((item, f, b))
                need = _needs((BACKWARD, m, v), s, S, V)
                live["grad_in"].append((item, when[need], b))
        out.append(live)
    return out


def buffer_slots(table: Timetable) -> int:
    """The fewest slots per buffer such that item k's slot, k % slots, is never written by
    another item while k still waits there to be read."""
    intervals = _live_intervals(table)

    def safe(slots: int) -> bool:
        for buffers in intervals:
            for items in buffers.values():
                for i, (k1, w1, r1) in enumerate(items):
                    for k2, w2, r2 in items[i + 1:]:
                        if k1 % slots == k2 % slots and w2 < r1 and w1 < r2:
                            return False
        return True

    items = table.microbatches * table.virtual_stages
    start = max(table.in_flight if table.has_backward else 1, 1)
    return next(n for n in range(start, items + 1) if safe(n))


def stage_transfers(table: Timetable) -> int:
    """Microbatch activations (or their gradients) each stage sends per training step.

    The loops send one per tick in each direction they run: a forward-and-backward table sends
    activations forward and gradients back every tick; a forward-only table sends activations
    every tick, its autodiff backward the gradients every tick, and the last stage's M outputs
    go to the head (which runs on every device) and their M gradients come back.
    """
    if table.has_backward:
        return 2 * table.ticks
    return 2 * table.ticks + 2 * table.microbatches


# --------------------------------------------------------------------------------------------
# The loops.


def _ring(S: int, wrap: bool, step: int) -> list[tuple[int, int]]:
    pairs = [(i, i + step) for i in range(S - 1)] if step > 0 else [
        (i + 1, i) for i in range(S - 1)]
    if wrap:
        pairs.append((S - 1, 0) if step > 0 else (0, S - 1))
    return pairs


def _manual(fn: Callable, mesh: Mesh, axes: Sequence[str], in_specs, out_specs) -> Callable:
    return shard_map(fn, mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes))


def _check(table: Timetable, mesh: Mesh, stage_axis: str, microbatches: int) -> None:
    S, M = table.stages, table.microbatches
    if mesh.shape[stage_axis] != S or microbatches != M:
        raise ValueError(
            f"the timetable is for {S} stages x {M} microbatches, the mesh has "
            f"{mesh.shape[stage_axis]} stages and the inputs {microbatches} microbatches"
        )


def _index(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


def forward(
    stage_fn: StageFn,
    stage_params: Any,
    inputs_M: jax.Array,
    extras_M: Any,
    table: Timetable,
    *,
    mesh: Mesh,
    stage_axis: str,
) -> jax.Array:
    """Run a forward-only timetable; returns the last chunk's output per microbatch.

    Args:
      stage_fn: see `StageFn`.
      stage_params: every leaf [S, V, ...]: stage s's chunk v (chunk v*S + s of the stack).
      inputs_M: [M, ...] the first chunk's input per microbatch.
      extras_M: leaves [M, ...] that `stage_fn` reads per microbatch (positions, masks).
      table: a forward-only timetable (`forward_timetable`) for S = mesh.shape[stage_axis].

    Returns:
      [M, ...] outputs, differentiable in stage_params, inputs_M and extras_M.
    """
    S, M, V = table.stages, table.microbatches, table.virtual_stages
    _check(table, mesh, stage_axis, inputs_M.shape[0])
    slots = buffer_slots(table)
    ops_TS = jnp.asarray(np.stack([table.code, table.microbatch, table.virtual], -1))

    def local(stage_params, inputs_M, extras_M):
        s = jax.lax.axis_index(stage_axis)
        params = _index(stage_params, 0)  # this stage's chunks, [V, ...]
        x_shape, x_dtype = inputs_M.shape[1:], inputs_M.dtype
        zeros_x = jnp.zeros(x_shape, x_dtype)

        def run_chunk(carry, m, v):
            inbox, outputs = carry
            x = jnp.where((s == 0) & (v == 0), inputs_M[m], inbox[(v * M + m) % slots])
            y = stage_fn(_index(params, v), x, _index(extras_M, m), m, v * S + s)
            done = (s == S - 1) & (v == V - 1)
            outputs = jnp.where(done, outputs.at[m].set(y), outputs)
            return (inbox, outputs), y

        def idle(carry, m, v):
            return carry, zeros_x

        def tick(carry, ops):
            code, m, v = ops[s, 0], ops[s, 1], ops[s, 2]
            carry, y = jax.lax.cond(code == FORWARD, run_chunk, idle, carry, m, v)
            y_in = jax.lax.ppermute(y, stage_axis, _ring(S, V > 1, 1))
            prev = ops[(s - 1) % S]  # what the stage before ran this tick (the table is global)
            chunk = prev[2] + jnp.where(s == 0, 1, 0)  # round the ring: the next chunk
            got = (prev[0] == FORWARD) & ((s > 0) | ((V > 1) & (prev[2] < V - 1)))
            inbox, outputs = carry
            inbox = jnp.where(got, inbox.at[(chunk * M + prev[1]) % slots].set(y_in), inbox)
            return (inbox, outputs), None

        carry = (jnp.zeros((slots, *x_shape), x_dtype), jnp.zeros_like(inputs_M))
        (_, outputs), _ = jax.lax.scan(tick, carry, ops_TS)
        return outputs[None]

    stage_spec = jax.tree.map(lambda _: PartitionSpec(stage_axis), stage_params)
    extras_spec = jax.tree.map(lambda _: PartitionSpec(), extras_M)
    fn = _manual(local, mesh, (stage_axis,), (stage_spec, PartitionSpec(), extras_spec),
                 PartitionSpec(stage_axis))
    return fn(stage_params, inputs_M, extras_M)[S - 1]


def run(
    stage_fn: StageFn,
    loss_fn: Callable[..., Any],
    stage_params: Any,
    head_params: Any,
    inputs_M: jax.Array,
    extras_M: Any,
    table: Timetable,
    *,
    mesh: Mesh,
    stage_axis: str,
    batch_axes: Sequence[str] = (),
    has_aux: bool = False,
) -> tuple[Any, ...]:
    """Run a forward-and-backward timetable; returns the loss and every gradient.

    Args:
      stage_fn: see `StageFn` (chunk = the stage's index: one chunk per stage).
      loss_fn: ``(head_params, y of the last stage, extras of the microbatch) -> scalar`` (or
        ``(scalar, aux)`` with `has_aux`; aux leaves are summed over microbatches): a sum over
        the microbatch's examples, so the gradients are sums over microbatches.
      stage_params: every leaf [S, ...], stage s's slice is its parameters; split over
        `stage_axis`.
      head_params: parameters of `loss_fn`, on every stage.
      inputs_M: [M, B, ...] the first stage's input per microbatch.
      extras_M: leaves [M, B, ...] that `stage_fn` and `loss_fn` read per microbatch.
      table: the timetable (`timetable`) for S = mesh.shape[stage_axis] and M.
      batch_axes: mesh axes B is split over by hand (then reduced here); without them every
        axis but the stage axis stays with the compiler, and shardings inside a stage follow
        the arrays' own and the constraints the stage function sets.

    Returns:
      (loss summed over microbatches, d stage_params, d head_params, d inputs_M), with the
      summed aux after the loss when `has_aux`.
    """
    S = table.stages
    _check(table, mesh, stage_axis, inputs_M.shape[0])
    if table.virtual_stages != 1 or not table.has_backward:
        raise ValueError(f"`run` executes forward-and-backward timetables of one chunk per "
                         f"stage; {table.schedule!r} is not one (use `forward`)")
    slots = buffer_slots(table)
    batch = tuple(batch_axes) or None
    ops_TS = jnp.asarray(np.stack([table.code, table.microbatch], -1))
    head_loss = loss_fn if has_aux else (lambda *a: (loss_fn(*a), ()))  # noqa: E731

    def local(stage_params, head_params, inputs_M, extras_M):
        s = jax.lax.axis_index(stage_axis)
        params = _index(stage_params, 0)  # this stage's slice
        first, last = s == 0, s == S - 1
        x_shape, x_dtype = inputs_M.shape[1:], inputs_M.dtype
        zeros_x = jnp.zeros(x_shape, x_dtype)
        aux_shape = jax.eval_shape(head_loss, head_params, zeros_x, _index(extras_M, 0))[1]
        zeros_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)
        state = dict(
            inbox=jnp.zeros((slots, *x_shape), x_dtype),  # activations from s-1
            saved=jnp.zeros((slots, *x_shape), x_dtype),  # stage inputs for B
            grad_in=jnp.zeros((slots, *x_shape), x_dtype),  # gradients from s+1
            d_params=jax.tree.map(jnp.zeros_like, params),
            d_head=jax.tree.map(jnp.zeros_like, head_params),
            d_inputs=jnp.zeros_like(inputs_M),
            loss=jnp.zeros((), jnp.float32),
            aux=zeros_aux,
        )

        def forward_op(state, m):
            slot = m % slots
            x = jnp.where(first, inputs_M[m], state["inbox"][slot])
            extras = _index(extras_M, m)
            y = stage_fn(params, x, extras, m, s)

            def head(y):
                (loss, aux), (d_head, d_y) = jax.value_and_grad(
                    head_loss, argnums=(0, 1), has_aux=True)(head_params, y, extras)
                aux = jax.tree.map(lambda a: a.astype(jnp.float32), aux)
                return loss.astype(jnp.float32), aux, d_head, d_y

            def no_head(y):
                return (jnp.zeros((), jnp.float32), zeros_aux,
                        jax.tree.map(jnp.zeros_like, head_params), jnp.zeros_like(y))

            loss, aux, d_head, d_y = jax.lax.cond(last, head, no_head, y)
            state = dict(state, saved=state["saved"].at[slot].set(x),
                         grad_in=jnp.where(last, state["grad_in"].at[slot].set(d_y),
                                           state["grad_in"]),
                         loss=state["loss"] + loss,
                         aux=jax.tree.map(jnp.add, state["aux"], aux),
                         d_head=jax.tree.map(jnp.add, state["d_head"], d_head))
            return state, y, zeros_x

        def backward_op(state, m):
            slot = m % slots
            extras = _index(extras_M, m)
            _, vjp = jax.vjp(lambda p, x: stage_fn(p, x, extras, m, s), params,
                             state["saved"][slot])
            d_params, d_x = vjp(state["grad_in"][slot])
            state = dict(state, d_params=jax.tree.map(jnp.add, state["d_params"], d_params),
                         d_inputs=jnp.where(first, state["d_inputs"].at[m].set(d_x),
                                            state["d_inputs"]))
            return state, zeros_x, d_x

        def idle(state, m):
            return state, zeros_x, zeros_x

        def tick(state, ops):
            code, m = ops[s, 0], ops[s, 1]
            state, y, d_x = jax.lax.switch(code, (idle, forward_op, backward_op), state, m)
            # What the neighbours ran this tick is in the (global) table; what they sent
            # arrives before the next tick.
            y_in = jax.lax.ppermute(y, stage_axis, _ring(S, False, 1))
            g_in = jax.lax.ppermute(d_x, stage_axis, _ring(S, False, -1))
            prev, nxt = ops[jnp.maximum(s - 1, 0)], ops[jnp.minimum(s + 1, S - 1)]
            got_y = (prev[0] == FORWARD) & (s > 0)
            got_g = (nxt[0] == BACKWARD) & (s < S - 1)
            state = dict(state, inbox=jnp.where(
                got_y, state["inbox"].at[prev[1] % slots].set(y_in), state["inbox"]),
                grad_in=jnp.where(got_g, state["grad_in"].at[nxt[1] % slots].set(g_in),
                                  state["grad_in"]))
            return state, None

        state, _ = jax.lax.scan(tick, state, ops_TS)

        reduce = (lambda x: jax.lax.psum(x, batch)) if batch else (lambda x: x)  # noqa: E731
        loss = jax.lax.psum(reduce(state["loss"]), stage_axis)
        aux = jax.tree.map(lambda a: jax.lax.psum(reduce(a), stage_axis), state["aux"])
        d_params = jax.tree.map(lambda g: reduce(g)[None], state["d_params"])
        # Summed over the stages in float32: the CPU compiler aborts on a half-precision
        # all-reduce here (its all-reduce promotion pass), and only one stage adds non-zeros.
        def over_stages(g):
            return jax.lax.psum(g.astype(jnp.float32), stage_axis).astype(g.dtype)

        d_head = jax.tree.map(lambda g: over_stages(reduce(g)), state["d_head"])
        d_inputs = over_stages(state["d_inputs"])  # split over the batch like the inputs
        return loss, aux, d_params, d_head, d_inputs

    stage_spec = jax.tree.map(lambda _: PartitionSpec(stage_axis), stage_params)
    head_spec = jax.tree.map(lambda _: PartitionSpec(), head_params)
    data_spec = PartitionSpec(None, batch) if batch else PartitionSpec()
    extras_spec = jax.tree.map(lambda _: data_spec, extras_M)
    fn = _manual(local, mesh, (stage_axis, *(batch or ())),
                 (stage_spec, head_spec, data_spec, extras_spec),
                 (PartitionSpec(), PartitionSpec(), stage_spec, head_spec, data_spec))
    loss, aux, d_stage, d_head, d_inputs = fn(stage_params, head_params, inputs_M, extras_M)
    if has_aux:
        return loss, aux, d_stage, d_head, d_inputs
    return loss, d_stage, d_head, d_inputs
