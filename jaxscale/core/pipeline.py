"""Pipeline parallelism: timetables of microbatches over stages, and the loop that runs them.

A model split into S stages of equal shape runs M microbatches through them. A *timetable* says,
for every tick and stage, which microbatch that stage runs forward (F), backward (B) or neither
(idle). One simulator builds every schedule from the order in which each stage wants its work
(`timetable`), running an operation at the first tick its input exists:

  gpipe  every stage: F(0..M-1), then B(0..M-1), in microbatch order: all forwards, then all
         backwards; M stage inputs are kept per stage.
  1f1b   stage s: S-1-s warm-up forwards, then one forward and one backward in turn, then the
         remaining backwards; at most S stage inputs are kept per stage.

With F and B ticks of equal length both schedules idle (S-1)/(M+S-1) of the stage-ticks (the
bubble); `Timetable.bubble_fraction` counts the idle slots of the table itself.

`run(...)` executes a timetable under `shard_map` over the stage axis, one `lax.scan` step per
tick (the table is read by tick and stage index, so the loop compiles once): each stage does its
operation (a `lax.switch` on the table's code for that stage), then activations move one
stage on and gradients one stage back with `ppermute`. A forward keeps only the stage's input; a
backward recomputes the stage under `jax.vjp` and accumulates the parameter gradients, so the
live activation memory of a stage is the number of microbatches its table holds in flight
(`Timetable.in_flight`): M for gpipe, S for 1f1b.

No mesh axis is named here: the caller passes the stage axis and the batch axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxscale.core.sharding.manual import shard_map

IDLE, FORWARD, BACKWARD = 0, 1, 2
SCHEDULES = ("gpipe", "1f1b")


@dataclasses.dataclass(frozen=True)
class Timetable:
    """Which operation each stage does at each tick.

    Attributes:
      schedule: the schedule's name.
      code: [ticks, stages] IDLE, FORWARD or BACKWARD.
      microbatch: [ticks, stages] the microbatch of that operation (0 where idle).
    """

    schedule: str
    code: np.ndarray
    microbatch: np.ndarray

    @property
    def stages(self) -> int:
        return self.code.shape[1]

    @property
    def microbatches(self) -> int:
        return int(np.sum(self.code[:, 0] == FORWARD))

    @property
    def ticks(self) -> int:
        return self.code.shape[0]

    @property
    def idle_slots(self) -> int:
        """Stage-ticks with nothing to do, counted in the table."""
        return int(np.sum(self.code == IDLE))

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks (F and B ticks of equal length)."""
        return self.idle_slots / self.code.size

    @property
    def in_flight(self) -> int:
        """The most microbatches whose stage input a stage holds at once (forward done, backward
        not yet): what bounds a stage's live activations."""
        most = 0
        for s in range(self.stages):
            live = 0
            for t in range(self.ticks):
                live += {FORWARD: 1, BACKWARD: -1}.get(int(self.code[t, s]), 0)
                most = max(most, live)
        return most


def _live_intervals(table: Timetable) -> list[dict[str, list[tuple[int, int, int]]]]:
    """Per stage and buffer, (microbatch, written at tick, read at tick) of what it holds: an
    activation from the stage before (written at the end of the tick it was sent, read by this
    stage's forward), a stage input (forward to backward), a gradient from the stage after (sent,
    or the last stage's own forward, to the backward)."""
    when = {(int(table.code[t, s]), int(table.microbatch[t, s]), s): t
            for t in range(table.ticks) for s in range(table.stages)
            if table.code[t, s] != IDLE}
    S, M = table.stages, table.microbatches
    out = []
    for s in range(S):
        live: dict[str, list[tuple[int, int, int]]] = {"inbox": [], "saved": [], "grad_in": []}
        for m in range(M):
            f, b = when[(FORWARD, m, s)], when[(BACKWARD, m, s)]
            if s > 0:
                live["inbox"].append((m, when[(FORWARD, m, s - 1)], f))
            live["saved"].append((m, f, b))
            live["grad_in"].append((m, when[(BACKWARD, m, s + 1)] if s < S - 1 else f, b))
        out.append(live)
    return out


def buffer_slots(table: Timetable) -> int:
    """The fewest slots per buffer such that microbatch m's slot, m % slots, is never written by
    another microbatch while m still waits there to be read."""
    intervals = _live_intervals(table)

    def safe(slots: int) -> bool:
        for buffers in intervals:
            for items in buffers.values():
                for i, (m1, w1, r1) in enumerate(items):
                    for m2, w2, r2 in items[i + 1:]:
                        if m1 % slots == m2 % slots and w2 < r1 and w1 < r2:
                            return False
        return True

    return next(n for n in range(max(table.in_flight, 1), table.microbatches + 1) if safe(n))


def bubble_formula(stages: int, microbatches: int) -> float:
    """(S - 1) / (M + S - 1): the idle share of gpipe and 1f1b with equal F and B ticks."""
    return (stages - 1) / (microbatches + stages - 1)


def _order(schedule: str, stages: int, microbatches: int, s: int) -> list[tuple[int, int]]:
    """The operations stage `s` wants, in order: (FORWARD | BACKWARD, microbatch)."""
    M = microbatches
    if schedule == "gpipe":
        return [(FORWARD, m) for m in range(M)] + [(BACKWARD, m) for m in range(M)]
    warmup = min(stages - 1 - s, M)
    ops = [(FORWARD, m) for m in range(warmup)]
    for m in range(M - warmup):
        ops += [(FORWARD, warmup + m), (BACKWARD, m)]
    return ops + [(BACKWARD, m) for m in range(M - warmup, M)]


def timetable(schedule: str, stages: int, microbatches: int) -> Timetable:
    """Simulate `schedule` on `stages` stages: each stage runs its next operation at the first
    tick whose inputs were produced at an earlier tick (F(m) on s needs F(m) on s-1; B(m) on s
    needs B(m) on s+1, or its own F(m) on the last stage).

    Raises:
      ValueError: an unknown schedule, or fewer microbatches than stages for 1f1b.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of: {', '.join(SCHEDULES)}")
    if schedule == "1f1b" and microbatches < stages:
        raise ValueError(
            f"pipeline.microbatches={microbatches} is below mesh.stage={stages}; 1f1b needs at "
            "least one microbatch per stage"
        )
    S, M = stages, microbatches
    orders = [_order(schedule, S, M, s) for s in range(S)]
    done: dict[tuple[int, int, int], int] = {}  # (code, microbatch, stage) -> tick
    nxt = [0] * S
    codes, mbs = [], []
    t = 0
    while any(nxt[s] < len(orders[s]) for s in range(S)):
        row_c, row_m = [IDLE] * S, [0] * S
        for s in range(S):
            if nxt[s] == len(orders[s]):
                continue
            code, m = orders[s][nxt[s]]
            if code == FORWARD:
                need = (FORWARD, m, s - 1) if s > 0 else None
            else:
                need = (BACKWARD, m, s + 1) if s < S - 1 else (FORWARD, m, s)
            if need is None or done.get(need, t) < t:
                row_c[s], row_m[s] = code, m
        for s in range(S):
            if row_c[s] != IDLE:
                done[(row_c[s], row_m[s], s)] = t
                nxt[s] += 1
        codes.append(row_c)
        mbs.append(row_m)
        t += 1
    return Timetable(schedule, np.array(codes, np.int32), np.array(mbs, np.int32))


def run(
    stage_fn: Callable[[Any, jax.Array], jax.Array],
    loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
    stage_params: Any,
    head_params: Any,
    inputs_M: jax.Array,
    extras_M: Any,
    table: Timetable,
    *,
    mesh: Mesh,
    stage_axis: str,
    batch_axes: Sequence[str] = (),
) -> tuple[jax.Array, Any, Any, jax.Array]:
    """Run a timetable's forwards and backwards; returns the loss and every gradient.

    Args:
      stage_fn: ``(params of one stage, x) -> y`` with y shaped like x.
      loss_fn: ``(head_params, y of the last stage, extras of the microbatch) -> scalar`` (a sum
        over the microbatch's examples: the gradients are sums over microbatches).
      stage_params: every leaf [S, ...], stage s's slice is its parameters; split over
        `stage_axis`.
      head_params: parameters of `loss_fn`, replicated.
      inputs_M: [M, B, ...] the first stage's input per microbatch, B split over `batch_axes`.
      extras_M: leaves [M, B, ...] that `loss_fn` reads (targets, masks), split like inputs_M.
      table: the timetable (`timetable`) for S = mesh.shape[stage_axis] and M.

    Returns:
      (loss summed over microbatches, d stage_params, d head_params, d inputs_M).
    """
    S, M = table.stages, table.microbatches
    if mesh.shape[stage_axis] != S or inputs_M.shape[0] != M:
        raise ValueError(
            f"the timetable is for {S} stages x {M} microbatches, the mesh has "
            f"{mesh.shape[stage_axis]} stages and the inputs {inputs_M.shape[0]} microbatches"
        )
    slots = buffer_slots(table)
    batch = tuple(batch_axes) or None
    code_TS, mb_TS = jnp.asarray(table.code), jnp.asarray(table.microbatch)

    def local(stage_params, head_params, inputs_M, extras_M):
        s = jax.lax.axis_index(stage_axis)
        params = jax.tree.map(lambda p: p[0], stage_params)  # this stage's slice
        first, last = s == 0, s == S - 1
        x_shape = inputs_M.shape[1:]
        zeros_x = jnp.zeros(x_shape, inputs_M.dtype)
        state = dict(
            inbox=jnp.zeros((slots, *x_shape), inputs_M.dtype),  # activations from s-1
            saved=jnp.zeros((slots, *x_shape), inputs_M.dtype),  # stage inputs for B
            grad_in=jnp.zeros((slots, *x_shape), inputs_M.dtype),  # gradients from s+1
            d_params=jax.tree.map(jnp.zeros_like, params),
            d_head=jax.tree.map(jnp.zeros_like, head_params),
            d_inputs=jnp.zeros_like(inputs_M),
            loss=jnp.zeros((), jnp.float32),
        )

        def forward(state, m):
            slot = m % slots
            x = jnp.where(first, inputs_M[m], state["inbox"][slot])
            y = stage_fn(params, x)
            extras = jax.tree.map(lambda e: e[m], extras_M)

            def head(y):
                loss, (d_head, d_y) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
                    head_params, y, extras)
                return loss.astype(jnp.float32), d_head, d_y

            def no_head(y):
                return (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, head_params),
                        jnp.zeros_like(y))

            loss, d_head, d_y = jax.lax.cond(last, head, no_head, y)
            state = dict(state, saved=state["saved"].at[slot].set(x),
                         grad_in=jnp.where(last, state["grad_in"].at[slot].set(d_y),
                                           state["grad_in"]),
                         loss=state["loss"] + loss,
                         d_head=jax.tree.map(jnp.add, state["d_head"], d_head))
            return state, y, zeros_x

        def backward(state, m):
            slot = m % slots
            _, vjp = jax.vjp(stage_fn, params, state["saved"][slot])
            d_params, d_x = vjp(state["grad_in"][slot])
            state = dict(state, d_params=jax.tree.map(jnp.add, state["d_params"], d_params),
                         d_inputs=jnp.where(first, state["d_inputs"].at[m].set(d_x),
                                            state["d_inputs"]))
            return state, zeros_x, d_x

        def idle(state, m):
            return state, zeros_x, zeros_x

        forward_perm = [(i, i + 1) for i in range(S - 1)]
        backward_perm = [(i + 1, i) for i in range(S - 1)]
        def tick(state, codes):
            code, m = codes[0][s], codes[1][s]
            state, y, d_x = jax.lax.switch(code, (idle, forward, backward), state, m)
            # What this stage sent, the neighbours receive before the next tick.
            sent = jnp.stack([code, m])
            y_in = jax.lax.ppermute(y, stage_axis, forward_perm)
            from_prev = jax.lax.ppermute(sent, stage_axis, forward_perm)
            g_in = jax.lax.ppermute(d_x, stage_axis, backward_perm)
            from_next = jax.lax.ppermute(sent, stage_axis, backward_perm)
            got_y = (from_prev[0] == FORWARD) & (s > 0)
            got_g = (from_next[0] == BACKWARD) & (s < S - 1)
            state = dict(state, inbox=jnp.where(
                got_y, state["inbox"].at[from_prev[1] % slots].set(y_in), state["inbox"]),
                grad_in=jnp.where(got_g, state["grad_in"].at[from_next[1] % slots].set(g_in),
                                  state["grad_in"]))
            return state, None

        state, _ = jax.lax.scan(tick, state, (code_TS, mb_TS))

        reduce = (lambda x: jax.lax.psum(x, batch)) if batch else (lambda x: x)  # noqa: E731
        loss = jax.lax.psum(reduce(state["loss"]), stage_axis)
        d_params = jax.tree.map(lambda g: reduce(g)[None], state["d_params"])
        d_head = jax.tree.map(lambda g: jax.lax.psum(reduce(g), stage_axis), state["d_head"])
        d_inputs = jax.lax.psum(state["d_inputs"], stage_axis)
        return loss, d_params, d_head, d_inputs

    stage_spec = jax.tree.map(lambda _: PartitionSpec(stage_axis), stage_params)
    head_spec = jax.tree.map(lambda _: PartitionSpec(), head_params)
    data_spec = PartitionSpec(None, batch)
    extras_spec = jax.tree.map(lambda _: data_spec, extras_M)
    fn = shard_map(local, mesh, in_specs=(stage_spec, head_spec, data_spec, extras_spec),
                   out_specs=(PartitionSpec(), stage_spec, head_spec, data_spec))
    return fn(stage_params, head_params, inputs_M, extras_M)
