"""Pipeline schedules: timetables (bubble, in-flight microbatches) and the loop that runs them,
equal to the unpipelined computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxscale.core import pipeline

D, B, LAYERS_PER_STAGE = 8, 4, 2


def _stage_fn(params, x, *_):
    def layer(x, p):
        return jnp.tanh(x @ p["w"] + p["b"]), None

    return jax.lax.scan(layer, x, params)[0]


def _loss_fn(head, y, extras):
    return jnp.sum(jnp.square(y @ head["h"] - extras["t"]))


def _problem(stages: int, microbatches: int, seed: int = 0, batch: int = B):
    keys = jax.random.split(jax.random.key(seed), 4)
    stage_params = {
        "w": jax.random.normal(keys[0], (stages, LAYERS_PER_STAGE, D, D)) / np.sqrt(D),
        "b": jax.random.normal(keys[1], (stages, LAYERS_PER_STAGE, D)) * 0.1,
    }
    head = {"h": jax.random.normal(keys[2], (D, 3))}
    x = jax.random.normal(keys[3], (microbatches, batch, D))
    extras = {"t": jax.random.normal(jax.random.key(seed + 1), (microbatches, batch, 3))}
    return stage_params, head, x, extras


def _reference(stage_params, head, x, extras):
    """Every stage in turn on every microbatch on one device: the definition."""
    def one(stage_params, head, x, extras):
        y = jax.lax.scan(lambda y, p: (_stage_fn(p, y), None), x, stage_params)[0]
        return _loss_fn(head, y, extras)

    def total(stage_params, head, x):
        per_microbatch = jax.vmap(one, in_axes=(None, None, 0, 0))
        return jnp.sum(per_microbatch(stage_params, head, x, extras))

    loss, grads = jax.value_and_grad(total, argnums=(0, 1, 2))(stage_params, head, x)
    return loss, *grads


@pytest.mark.parametrize("schedule", pipeline.LOOP_SCHEDULES)
@pytest.mark.parametrize("stages, microbatches", [(2, 4), (4, 8), (4, 4), (3, 7), (8, 16)])
def test_timetable_bubble_equals_the_formula(schedule, stages, microbatches):
    table = pipeline.timetable(schedule, stages, microbatches)
    assert table.ticks == 2 * (microbatches + stages - 1)
    assert table.idle_slots == 2 * stages * (stages - 1)  # counted in the table
    assert table.bubble_fraction == pytest.approx(pipeline.bubble_formula(stages, microbatches))
    for s in range(stages):  # every stage runs each microbatch forward once, backward once
        for code in (pipeline.FORWARD, pipeline.BACKWARD):
            ran = table.microbatch[table.code[:, s] == code, s]
            assert sorted(ran.tolist()) == list(range(microbatches))
    assert table.in_flight == (microbatches if schedule == "gpipe" else stages)
    # the loop's buffers need no more slots than that: no microbatch overwrites a waiting one
    assert pipeline.buffer_slots(table) == table.in_flight


def test_1f1b_needs_a_microbatch_per_stage():
    with pytest.raises(ValueError) as e:
        pipeline.timetable("1f1b", 4, 3)
    assert str(e.value) == ("pipeline.microbatches=3 is below mesh.stage=4; 1f1b needs at least "
                            "one microbatch per stage")


@pytest.mark.parametrize("schedule, stages, data", [("gpipe", 2, 4), ("1f1b", 4, 2),
                                                    ("1f1b", 8, 1)])
def test_pipelined_loss_and_gradients_equal_the_reference(schedule, stages, data):
    M = 8
    devices = np.array(jax.devices()[: stages * data]).reshape(stages, data)
    mesh = Mesh(devices, ("stage", "data"))
    problem = _problem(stages, M)
    table = pipeline.timetable(schedule, stages, M)
    got = jax.jit(lambda *a: pipeline.run(_stage_fn, _loss_fn, *a, table, mesh=mesh,
                                          stage_axis="stage", batch_axes=("data",)))(*problem)
    want = _reference(*problem[:3], problem[3])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
        # rel 1e-5 of each gradient's scale (sums of 8 microbatches' squared errors)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_1f1b_holds_at_most_half_the_activations_of_gpipe():
    """M=16 microbatches on 4 stages: 1f1b keeps 4 stage inputs per stage, gpipe 16."""
    stages, M = 4, 16
    mesh = Mesh(np.array(jax.devices()[:stages]), ("stage",))
    problem = _problem(stages, M, batch=256)  # activations large next to the fixed buffers
    temp = {}
    for schedule in pipeline.LOOP_SCHEDULES:
        table = pipeline.timetable(schedule, stages, M)
        fn = jax.jit(lambda *a, table=table: pipeline.run(
            _stage_fn, _loss_fn, *a, table, mesh=mesh, stage_axis="stage"))
        temp[schedule] = fn.lower(*problem).compile().memory_analysis().temp_size_in_bytes
    assert 2 * temp["1f1b"] <= temp["gpipe"], temp


@pytest.mark.parametrize("schedule, stages, microbatches, virtual",
                         [("gpipe", 4, 8, 1), ("gpipe", 3, 5, 1), ("circular", 4, 8, 2),
                          ("circular", 2, 4, 3), ("circular", 4, 4, 1)])
def test_forward_timetable_bubble_equals_the_formula(schedule, stages, microbatches, virtual):
    table = pipeline.forward_timetable(schedule, stages, microbatches, virtual)
    assert table.ticks == virtual * microbatches + stages - 1
    assert table.idle_slots == stages * (stages - 1)
    assert table.bubble_fraction == pytest.approx(
        pipeline.bubble_formula(stages, microbatches, virtual))
    assert (table.virtual_stages, table.microbatches) == (virtual, microbatches)
    for s in range(stages):  # every stage runs each chunk of each microbatch once
        ran = table.code[:, s] == pipeline.FORWARD
        pairs = sorted(zip(table.virtual[ran, s].tolist(), table.microbatch[ran, s].tolist(),
                           strict=True))
        assert pairs == [(v, m) for v in range(virtual) for m in range(microbatches)]
    assert table.in_flight == virtual * microbatches  # all held for the autodiff backward


@pytest.mark.parametrize("schedule, virtual, message", [
    ("1f1b", 2, "pipeline.virtual_stages=2 needs pipeline.schedule='circular' (not '1f1b'); set "
     "pipeline.virtual_stages=1"),
    ("circular", 2, "pipeline.microbatches=6 is not a multiple of mesh.stage=4; the circular "
     "schedule sends microbatches round the stages in groups of mesh.stage"),
    ("zigzag", 1, "pipeline.schedule='zigzag' is not one of: gpipe, circular, 1f1b"),
])
def test_schedule_errors(schedule, virtual, message):
    with pytest.raises(ValueError) as e:
        pipeline.check_schedule(schedule, 4, 6, virtual)
    assert str(e.value) == message


def _chunked(stage_params, stages, virtual):
    """[S*V, ...] chunks in layer order -> [S, V, ...] (chunk v*S + s on stage s)."""
    return jax.tree.map(lambda p: jnp.swapaxes(p.reshape(virtual, stages, *p.shape[1:]), 0, 1),
                        stage_params)


@pytest.mark.parametrize("schedule, stages, virtual", [("gpipe", 2, 1), ("circular", 4, 2)])
def test_forward_by_autodiff_equals_the_reference(schedule, stages, virtual):
    """The forward-only loop under autodiff (gpipe, circular) on stage x data, data left to the
    compiler: loss and every gradient equal one device's."""
    M, data = 8, 8 // stages
    mesh = Mesh(np.array(jax.devices()[: stages * data]).reshape(stages, data),
                ("stage", "data"))
    chunks, head, x, extras = _problem(stages * virtual, M)
    table = pipeline.forward_timetable(schedule, stages, M, virtual)

    def total(chunks, head, x):
        y = pipeline.forward(_stage_fn, _chunked(chunks, stages, virtual), x, extras, table,
                             mesh=mesh, stage_axis="stage")
        return jnp.sum(jax.vmap(_loss_fn, in_axes=(None, 0, 0))(head, y, extras))

    got = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(chunks, head, x)
    want = _reference(chunks, head, x, extras)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_1f1b_with_the_batch_left_to_the_compiler():
    """`run` manual over the stage axis only (what training uses): equal to one device."""
    stages, M = 4, 8
    mesh = Mesh(np.array(jax.devices()).reshape(stages, 2), ("stage", "data"))
    problem = _problem(stages, M)
    table = pipeline.timetable("1f1b", stages, M)
    got = jax.jit(lambda *a: pipeline.run(_stage_fn, _loss_fn, *a, table, mesh=mesh,
                                          stage_axis="stage"))(*problem)
    want = _reference(*problem[:3], problem[3])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
