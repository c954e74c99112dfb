"""Pipelined training (mesh.stage > 1) against one device: every schedule, fsdp and tensor
parallelism inside a stage, the bubble `inspect` reports, 1f1b's memory, checkpoints that move
between pipelined and unpipelined runs, and the settings' errors."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from util import assert_trees_close, full_lm_batch, small_lm_overrides

from jaxscale import config as config_lib
from jaxscale.analysis import hlo, metrics
from jaxscale.analysis.inspection import compile_run, pipeline_report
from jaxscale.checkpoint.manager import Checkpointer
from jaxscale.core import pipeline
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError
from jaxscale.run.build import build

SEQ, BATCH = 16, 32
SMALL = [*small_lm_overrides(seq_len=SEQ, batch_size=BATCH), "model.num_layers=8"]
MESHES = {
    "single": ["mesh.fsdp=1"],
    "gpipe_stage2_fsdp4": ["mesh.stage=2", "mesh.fsdp=4", "pipeline.schedule=gpipe"],
    "circular_stage4_data2": ["mesh.stage=4", "mesh.data=2", "pipeline.schedule=circular",
                              "pipeline.virtual_stages=2"],
    "1f1b_stage4_data2": ["mesh.stage=4", "mesh.data=2", "pipeline.schedule=1f1b"],
    "1f1b_stage2_tensor2_fsdp2": ["mesh.stage=2", "mesh.tensor=2", "mesh.fsdp=2",
                                  "pipeline.schedule=1f1b"],
}
PIPELINED = [name for name in MESHES if name != "single"]


def _cfg(mesh_name: str, *extra: str, microbatches: int = 8):
    return config_lib.load("tiny", [*SMALL, *MESHES[mesh_name],
                                    f"pipeline.microbatches={microbatches}", *extra])


def _run(mesh_name: str, *extra: str):
    cfg = _cfg(mesh_name, *extra)
    devices = jax.devices()[:1] if mesh_name == "single" else None
    return build(cfg, mesh=make_mesh(cfg.mesh, devices=devices))


def _train(run, state, steps):
    losses, metrics_ = [], None
    for i in steps:
        batch = jax.device_put(full_lm_batch(i, BATCH, SEQ), run.batch_shardings)
        state, metrics_ = run.train_step(state, batch, jax.random.key(0))
        losses.append(float(metrics_["loss"]))
    return state, losses, jax.device_get(metrics_)


@functools.cache
def three_steps(mesh_name: str):
    run = _run(mesh_name)
    state, losses, last = _train(run, run.init_state(), range(3))
    return np.array(losses), jax.device_get(state.params), last


@pytest.mark.parametrize("mesh_name", PIPELINED)
def test_three_pipelined_steps_equal_one_device(mesh_name):
    ref_losses, ref_params, ref_metrics = three_steps("single")
    losses, params, last = three_steps(mesh_name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params)
    # the step's metrics are those of the unpipelined step
    assert set(last) == set(ref_metrics)
    assert last["tokens"] == ref_metrics["tokens"] == BATCH * SEQ
    np.testing.assert_allclose(last["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)


def test_a_pipelined_evaluation_equals_one_device():
    sums = {}
    for name in ("single", "1f1b_stage4_data2"):
        run = _run(name)
        state = run.init_state()
        batch = jax.device_put(full_lm_batch(7, BATCH, SEQ), run.batch_shardings)
        sums[name] = jax.device_get(run.eval_step(state, batch, {}))
    for key, value in sums["single"].items():
        np.testing.assert_allclose(sums["1f1b_stage4_data2"][key], value, rtol=1e-5)


@pytest.mark.parametrize("mesh_name, stages, microbatches, virtual", [
    ("gpipe_stage2_fsdp4", 2, 8, 1), ("circular_stage4_data2", 4, 8, 2),
    ("1f1b_stage4_data2", 4, 8, 1), ("1f1b_stage4_data2", 4, 16, 1)])
def test_inspect_reports_the_bubble_of_the_formula_and_of_the_timetable(
        mesh_name, stages, microbatches, virtual):
    cfg = _cfg(mesh_name, microbatches=microbatches)
    run = build(cfg)
    report, table = pipeline_report(run), run.pipeline.table()
    # idle stage-ticks counted in the schedule's own timetable
    idle = int(np.sum(table.code == pipeline.IDLE))
    assert report.idle_slots == idle == stages * (stages - 1) * (2 if table.has_backward else 1)
    assert report.bubble_fraction == idle / table.code.size
    assert report.bubble_fraction == pytest.approx(
        (stages - 1) / (virtual * microbatches + stages - 1))
    assert report.bubble_formula == pytest.approx(report.bubble_fraction)
    assert report.in_flight == (stages if cfg.pipeline.schedule == "1f1b"
                                else virtual * microbatches)
    # one microbatch's activations [B/M, T, D] per device, over the batch devices
    batch_devices = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    assert report.transfer_bytes == BATCH // microbatches * SEQ * 32 * 4 // batch_devices


def test_1f1b_holds_at_most_half_the_activations_of_gpipe_at_16_microbatches():
    """Same model and mesh (stage=4 x data=2), M=16: compiled memory analysis per device."""
    temps, permuted = {}, {}
    for schedule in ("gpipe", "1f1b"):
        cfg = _cfg("1f1b_stage4_data2", f"pipeline.schedule={schedule}", "seq_len=32",
                   microbatches=16)
        run = build(cfg)
        compiled = compile_run(run)
        temps[schedule] = metrics.compiled_stats(compiled.compiled).temp_bytes
        permutes = hlo.summarize(hlo.collectives(compiled.compiled.as_text(), 8))
        permuted[schedule] = (permutes["collective-permute"].bytes, pipeline_report(run))
    assert 2 * temps["1f1b"] <= temps["gpipe"], temps
    # the stage-to-stage bytes inspect reports are the compiled step's collective-permutes:
    # 1f1b's loop (2 per tick); gpipe's loop, its transpose and the M outputs to the head and back
    for schedule, (hlo_bytes, report) in permuted.items():
        assert hlo_bytes == report.stage_bytes, schedule


def _checkpointed_continuation(tmp_path, first: str, second: str) -> list[float]:
    """Two steps on `first`, saved; restored on `second`, one more step: its loss."""
    run = _run(first, f"checkpoint.dir={tmp_path}", "checkpoint.async_save=false")
    state, _, _ = _train(run, run.init_state(), range(2))
    with Checkpointer(run.cfg, run.mesh, log=lambda m: None) as ckpt:
        ckpt.restore_or_init(lambda: state, run.abstract, run.shardings, rng=jax.random.key(0))
        ckpt.save(2, state, {"step": 2})
    again = _run(second, f"checkpoint.dir={tmp_path}")
    with Checkpointer(again.cfg, again.mesh, log=lambda m: None) as ckpt:
        restored, _, _ = ckpt.restore_or_init(again.init_state, again.abstract, again.shardings,
                                              rng=jax.random.key(0))
    assert int(restored.step) == 2
    assert_trees_close(jax.device_get(restored.params), jax.device_get(state.params), rtol=0,
                       atol=0)
    _, losses, _ = _train(again, restored, [2])
    return losses


@pytest.mark.parametrize("first, second", [("1f1b_stage4_data2", "single"),
                                           ("single", "1f1b_stage4_data2")])
def test_checkpoints_move_between_stage4_and_stage1(tmp_path, first, second):
    """The pipelined parameter tree is the unpipelined one: a stage=4 checkpoint restores into
    stage=1 (and back) with equal values, and the next step's loss is the never-pipelined run's."""
    ref_losses = three_steps("single")[0]
    np.testing.assert_allclose(_checkpointed_continuation(tmp_path, first, second),
                               ref_losses[2:], rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.stage=4", "model.num_layers=6", "pipeline.microbatches=8"],
     "model.num_layers=6 is not divisible by mesh.stage x pipeline.virtual_stages = 4 x 1 = 4; "
     "every chunk of the layer stack needs the same number of layers"),
    (["mesh.stage=2", "model.num_layers=6", "pipeline.schedule=circular",
      "pipeline.virtual_stages=2", "pipeline.microbatches=8"],
     "model.num_layers=6 is not divisible by mesh.stage x pipeline.virtual_stages = 2 x 2 = 4; "
     "every chunk of the layer stack needs the same number of layers"),
    (["mesh.stage=4", "pipeline.schedule=1f1b", "pipeline.microbatches=2"],
     "pipeline.microbatches=2 is below mesh.stage=4; 1f1b needs at least one microbatch per "
     "stage"),
    (["mesh.stage=2", "batch_size=12", "pipeline.microbatches=8"],
     "batch_size=12 is not divisible by pipeline.microbatches=8 (each microbatch needs the same "
     "number of sequences)"),
    (["mesh.stage=2", "pipeline.microbatches=4", "optim.grad_accum=2"],
     "optim.grad_accum=2 with mesh.stage=2: a pipelined step accumulates over "
     "pipeline.microbatches; set optim.grad_accum=1"),
    (["mesh.stage=2", "pipeline.microbatches=4", "model.scan_layers=false"],
     "mesh.stage=2 cannot pipeline model.scan_layers=false (stages split the scanned stack); "
     "set mesh.stage=1"),
    (["mesh.stage=2", "pipeline.microbatches=4", "model.moe.num_experts=4"],
     "mesh.stage=2 cannot pipeline model.moe.num_experts=4; set mesh.stage=1"),
    (["mesh.stage=2", "pipeline.microbatches=0"],
     "pipeline.microbatches=0 must be positive"),
])
def test_bad_pipeline_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_lib.load("tiny", overrides)
    assert str(e.value) == message


def test_a_microbatch_that_does_not_split_over_the_batch_devices():
    cfg = config_lib.load("tiny", [*SMALL, *MESHES["gpipe_stage2_fsdp4"], "batch_size=16",
                                   "pipeline.microbatches=8"])
    with pytest.raises(ConfigError) as e:
        build(cfg)
    assert str(e.value) == ("the microbatch (batch_size=16 / pipeline.microbatches=8 = 2) is not "
                            "divisible by the 4 devices that shard the batch (mesh.data=1 x "
                            "mesh.fsdp=4)")
