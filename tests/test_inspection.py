"""`jaxscale inspect`: bytes per device, collectives by strategy, donation and warnings, checked
against what the shardings and the theory of each strategy say."""

import dataclasses
import math
import os

import numpy as np
import pytest

from jaxscale import cli
from jaxscale import config as config_lib
from jaxscale.analysis import hlo
from jaxscale.analysis.inspection import capture_stderr, compile_step, inspect_compiled

SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=128", "seq_len=16", "batch_size=16"]


def _cfg(*overrides):
    return config_lib.load("tiny", [*SMALL, *overrides])


@pytest.fixture(scope="module")
def fsdp():
    return compile_step(_cfg("mesh.fsdp=8", "sharding.rules=fsdp"))


@pytest.fixture(scope="module")
def dp():
    return compile_step(_cfg("mesh.fsdp=1", "mesh.data=8", "sharding.rules=dp"))


def _param_rows(report):
    return [r for r in report.rows if r.path.startswith("params/")]


def test_fsdp_bytes_per_device_are_params_over_8_plus_the_replicated_rest(fsdp):
    report = inspect_compiled(fsdp)
    rows = _param_rows(report)
    total = sum(math.prod(r.shape) * np.dtype(r.dtype).itemsize for r in rows)
    replicated = sum(r.total_bytes for r in rows if all(t is None for t in r.spec))
    assert 0 < replicated < total / 20  # the norm scales only
    assert report.memory.params == (total - replicated) // 8 + replicated
    # AdamW keeps two float32 moments of every parameter, sharded like it (+ int32 counters)
    counters = sum(r.total_bytes for r in report.rows
                   if r.path.startswith("opt_state/") and r.shape == ())
    assert 0 < counters <= 16
    assert report.memory.optimizer == 2 * report.memory.params + counters
    # XLA's argument bytes are exactly the state and the batch shard (and the RNG key)
    state = report.memory.params + report.memory.optimizer + report.memory.other_state
    assert report.memory.arguments - state - report.memory.batch in (0, 8)
    # donation: the whole state is updated in place
    assert report.memory.aliased == state
    assert report.memory.temps > 0


def test_collectives_follow_the_strategy(dp, fsdp):
    """dp: gradients all-reduced, no all-gather; fsdp: parameters all-gathered (forward and
    backward) and gradients reduce-scattered (on the CPU: an all-reduce whose result is only
    sliced)."""
    d, f = inspect_compiled(dp), inspect_compiled(fsdp)
    ds, fs = d.collective_summary(), f.collective_summary()
    param_bytes = sum(r.total_bytes for r in _param_rows(d))
    # dp: one all-reduce of every float32 gradient, nothing gathered, nothing sliced
    assert ds["all-gather"].count == 0 and ds["reduce-scatter"].count == 0
    assert param_bytes <= ds["all-reduce"].bytes < 1.05 * param_bytes
    assert sum(c.sliced_bytes for c in d.collectives) == 0
    # fsdp: each layer's weights gathered for the forward and again for the backward pass (the
    # embedding is looked up shard by shard, the output projection gathered once)
    sharded = sum(r.total_bytes for r in _param_rows(f) if any(r.spec))
    layers = sum(r.total_bytes for r in _param_rows(f) if any(r.spec) and "/layers/" in r.path)
    assert fs["all-gather"].count >= 2 * 2 * 7  # 7 kernels per layer, 2 layers, twice
    assert 2 * layers <= fs["all-gather"].bytes < 2 * param_bytes
    # ... and their gradients reduce-scattered: all-reduced, then only a slice is kept
    sliced = sum(c.sliced_bytes * c.trips for c in f.collectives)
    assert layers <= sliced <= sharded


def test_replicated_parameter_warning(dp, fsdp):
    warned = inspect_compiled(dp, replicated_warn_bytes=4096).warnings
    assert any("params/embed/embedding" in w and "replicated on all 8" in w for w in warned)
    assert any("params/lm_head/kernel" in w for w in warned)
    # the norm scales (512 B) stay under the threshold; nothing is replicated under fsdp
    assert not any("norm" in w for w in warned)
    assert inspect_compiled(fsdp, replicated_warn_bytes=4096).warnings == []


def test_involuntary_remat_in_the_compile_log_becomes_a_warning(fsdp):
    line = ("W1123 spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. The "
            "compiler cannot go from sharding {devices=[8,1]<=[8]} to {replicated}")
    report = inspect_compiled(dataclasses.replace(fsdp, log="I0 other\n" + line + "\n"))
    (warning,) = report.warnings
    assert warning.startswith("XLA: Involuntary full rematerialization")


def test_capture_stderr_sees_writes_from_native_code():
    with capture_stderr() as captured:
        os.write(2, b"W0000 Involuntary full rematerialization of %x\n")
    assert hlo.involuntary_remats(captured[0]) == ["W0000 Involuntary full rematerialization of %x"]


def test_inspect_command_prints_every_section(capsys):
    assert cli.main(["inspect", "--config", "tiny", *SMALL, "mesh.fsdp=8",
                     "sharding.rules=fsdp"]) == 0
    out = capsys.readouterr().out
    for needle in ("params/layers/mlp/wi_up/kernel", "('data', 'fsdp')", "optimizer state",
                   "activations/temps", "FLOPs per step", "all-gather", "reduce-scatter",
                   "collective-permute", "warnings: none"):
        assert needle in out, needle


def test_expert_and_ring_exchanges_appear_in_the_collectives_table():
    """inspect's table holds the experts' all-to-alls (expert=4) and the ring's permutes."""
    def table(*overrides):
        text = inspect_compiled(compile_step(_cfg(*overrides))).format()
        return {line.split()[0]: line for line in text.splitlines()
                if line.split()[:1] and line.split()[0] in hlo.KINDS}

    moe = table("model.moe.num_experts=8", "model.moe.top_k=2", "mesh.fsdp=2", "mesh.expert=4")
    ring = table("mesh.fsdp=2", "mesh.sequence=4", "model.context_parallel=ring")
    assert int(moe["all-to-all"].split()[1]) > 0 and not moe["all-to-all"].endswith(" 0 B")
    assert int(ring["collective-permute"].split()[1]) > 0


def test_bf16_compute_gathers_the_weights_in_bf16(fsdp):
    """FSDP casts the float32 weights to the compute dtype before gathering them, and the
    weight gradients leave the bf16 matmuls in bf16: with model.dtype=bfloat16 the partitioned
    step gathers half the bytes. The CPU backend widens bf16 collectives to f32 after
    partitioning (its compiled module moves the float32 step's bytes); GPUs and TPUs do not, and
    the report counts what they move."""
    bf16 = compile_step(_cfg("mesh.fsdp=8", "sharding.rules=fsdp", "model.dtype=bfloat16"))
    f32_report, bf16_report = inspect_compiled(fsdp), inspect_compiled(bf16)

    def gathered(compiled, items):
        """(float bytes, integer bytes) all-gathered per step: weights, and token indices."""
        types = hlo.parse(compiled.compiled.as_text())
        out = [0, 0]
        for c in items:
            if c.kind == "all-gather":
                out[types[c.name].type.startswith("s")] += c.bytes * c.trips
        return out

    weights, indices = gathered(fsdp, f32_report.collectives)
    assert weights > 0
    assert gathered(bf16, bf16_report.collectives) == [weights // 2, indices]
    # the CPU's own module: the same bytes as the float32 step's
    raw = hlo.collectives(bf16.compiled.as_text(), 8)
    assert gathered(bf16, raw) == [weights, indices]
    # weight gradients reduced in bf16, the norm scales' and the scalars' in f32
    f32_reduced = f32_report.collective_summary()["all-reduce"].bytes
    assert f32_reduced / 2 < bf16_report.collective_summary()["all-reduce"].bytes < f32_reduced
    assert "widens bf16 collectives to f32" in bf16_report.format()


@pytest.mark.parametrize("model", ["decoder", "decoder_nnx"])
def test_float32_weight_gradients_are_reduced_in_float32(fsdp, model):
    """model.weight_grad_dtype=float32 with bf16 compute: the weights are still gathered in
    bf16, and their gradients leave the matmuls, and are reduced across the devices, in float32:
    exactly the float32 step's reduction bytes."""
    cfg = _cfg("mesh.fsdp=8", "sharding.rules=fsdp", "model.dtype=bfloat16",
               "model.weight_grad_dtype=float32", f"model.name={model}")
    mixed = inspect_compiled(compile_step(cfg)).collective_summary()
    plain = inspect_compiled(fsdp).collective_summary()
    assert mixed["all-reduce"].bytes == plain["all-reduce"].bytes
    assert mixed["all-gather"].bytes < 0.51 * plain["all-gather"].bytes
