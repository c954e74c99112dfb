"""Profiling: `profile.steps=[start,stop]` leaves a jax.profiler trace in the workdir, and
`tracing.summarize_trace` reads it back into device time per kernel category."""

import pathlib

import pytest

from jaxscale import config as config_lib
from jaxscale.analysis import tracing
from jaxscale.errors import ConfigError
from jaxscale.run.loop import train

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=16", "eval_batches=1", "progress=false",
         "optim.warmup_steps=2", "data.source=synthetic", "eval_every=0", "log_every=1"]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("profiled")
    cfg = config_lib.load("tiny", [*SMALL, "steps=4", "profile.steps=[1,3]",
                                   f"workdir={workdir}"])
    train(cfg)
    return workdir


def test_profile_steps_leave_a_trace_in_the_workdir(profiled_run):
    files = [p for p in (profiled_run / "profile").rglob("*") if p.is_file()]
    names = {p.name.split(".", 1)[1] for p in files}
    assert {"xplane.pb", "trace.json.gz"} <= names, files
    assert all(p.stat().st_size > 0 for p in files)
    # the trace is of the profiled steps: the train step's module ran in it
    text = tracing.find_trace(profiled_run / "profile").read_bytes()
    assert b"jit_train_step" in text or b"train_step" in text


def test_summarize_trace_reads_device_time(profiled_run):
    summary = tracing.summarize_trace(profiled_run / "profile")
    assert summary.wall_ns > 0 and 0 < summary.busy_ns <= summary.wall_ns
    # FSDP over 8 devices: the all-gathers and all-reduces are there, and so is compute
    assert summary.by_category["collective"] > 0
    assert summary.by_category.get("matmul", 0) + summary.by_category.get("other", 0) > 0
    assert abs(sum(ns for _, _, ns, _ in summary.top) - sum(summary.by_category.values())) < 1
    text = summary.format(steps=2)
    assert "ms per step" in text and "collective" in text and "top kernels" in text


@pytest.mark.parametrize("kernel, hlo_op, category", [
    ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "command_buffer_13", "matmul"),
    ("gemm_fusion_dot_12", "", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "", "attention"),
    ("ncclDevKernel_AllGather_RING_LL", "all-gather-start.3", "collective"),
    ("memcpy32_post", "", "copy"),
    ("input_add_multiply_reduce_fusion_8", "", "other"),
    ("ynn_fusion.3", "dot.12", "matmul"),
])
def test_categories(kernel, hlo_op, category):
    assert tracing.categorize(kernel, hlo_op) == category


def test_find_trace_names_a_missing_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb trace under"):
        tracing.find_trace(tmp_path)


def test_profile_stop_beyond_the_run_is_rejected():
    message = r"profile.steps=\[2, 9\] must be .* <= steps \(steps=5\)"
    with pytest.raises(ConfigError, match=message):
        config_lib.load("tiny", ["steps=5", "profile.steps=[2,9]"])


def test_trace_dir_is_under_the_workdir(profiled_run):
    assert tracing.find_trace(profiled_run / "profile").is_relative_to(
        pathlib.Path(profiled_run) / "profile")
