"""`jaxscale plan`: candidate meshes, the step-time model, the memory check against the analytic
count of parameters and optimizer state, the recommendation, and the command line."""

import os
import subprocess
import sys

import pytest

from jaxscale import config as config_lib
from jaxscale.analysis import hlo, roofline
from jaxscale.analysis import plan as plan_lib
from jaxscale.core import pipeline
from jaxscale.errors import ConfigError

SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=128", "seq_len=16", "batch_size=16"]


def _cfg(*overrides):
    return config_lib.load("tiny", [*SMALL, *overrides])


def test_candidates_respect_divisibility():
    h100 = roofline.TARGETS["h100"]
    got = {(c.strategy, c.label) for c in plan_lib.candidates(_cfg(), 8, h100, ("full",))}
    # kv heads = 2 limits tensor parallelism to 2; one node of 8 leaves no room for hsdp; two
    # layers leave two pipeline stages
    assert got == {("dp", "data=8"), ("fsdp", "fsdp=8"), ("fsdp_tp", "fsdp=4 x tensor=2"),
                   ("pp", "stage=2 x fsdp=4")}
    on_4_nodes = {(c.strategy, c.label) for c in
                  plan_lib.candidates(config_lib.load("llama-8b"), 32, h100, ("full",))}
    assert ("hsdp", "data=4 x fsdp=8") in on_4_nodes and ("hsdp", "data=2 x fsdp=16") in on_4_nodes
    assert ("fsdp_tp", "fsdp=4 x tensor=8") in on_4_nodes


def test_comm_model_ring_factors_links_and_sliced_all_reduce():
    t = roofline.Target("t", 1e12, 1e9, devices_per_node=4, intra_bw=100.0, inter_bw=10.0,
                        fused_attention=True)
    inside = ((0, 1, 2, 3),)
    across = ((0, 4),)
    cases = [
        (hlo.Collective("all-gather", "a", 400, 4, inside), 400 * 3 / 4 / 100),
        (hlo.Collective("all-reduce", "b", 400, 4, inside), 2 * 400 * 3 / 4 / 100),
        (hlo.Collective("all-reduce", "c", 400, 4, inside, sliced_bytes=400), 400 * 3 / 4 / 100),
        (hlo.Collective("reduce-scatter", "d", 200, 2, across), 200 / 2 / 10),
        (hlo.Collective("collective-permute", "e", 50, 2, across, trips=3), 3 * 50 / 10),
    ]
    for c, expected in cases:
        assert roofline.comm_seconds([c], t)[0] == pytest.approx(expected), c.name
    total, by_kind = roofline.comm_seconds([c for c, _ in cases], t)
    assert total == pytest.approx(sum(e for _, e in cases))
    assert by_kind["all-reduce"] == 800 and by_kind["collective-permute"] == 150


def test_compute_model_counts_the_recompute():
    cfg = config_lib.load("llama-8b")
    t = roofline.TARGETS["h100"]
    none, model_s = roofline.compute_seconds(cfg, "none", 64, t)
    minimal, _ = roofline.compute_seconds(cfg, "minimal", 64, t)
    full, _ = roofline.compute_seconds(cfg, "full", 64, t)
    assert none == pytest.approx(model_s)
    assert model_s < minimal < full < 4 / 3 * model_s
    # 256 x 8192 tokens x 51.47 GFLOP/token over 64 x 989 TFLOP/s
    assert model_s == pytest.approx(256 * 8192 * 51_470_401_536 / 64 / 989e12)


@pytest.mark.parametrize("text, value", [("80GB", 80e9), ("74.5GiB", 74.5 * 2**30),
                                         ("1024", 1024.0), ("16 MiB", 16 * 2**20)])
def test_parse_bytes(text, value):
    assert plan_lib.parse_bytes(text) == value


def test_unknown_target_and_remat_fail_before_compiling():
    with pytest.raises(ConfigError, match="--target 'h1000' is not known"):
        plan_lib.plan(_cfg(), 8, "h1000")
    with pytest.raises(ConfigError, match="--remat 'ful' is not a remat policy"):
        plan_lib.plan(_cfg(), 8, "h100", remats=("ful",))


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ConfigError, match="--device-memory '80 apples' is not a size"):
        plan_lib.parse_bytes("80 apples")


@pytest.fixture(scope="module")
def small_plan():
    # 1.5 MiB per device: the replicated (dp) state and its update do not fit, sharded ones do
    return plan_lib.plan(_cfg(), 8, "h100", device_memory=1.5 * 2**20, remats=("full",),
                         usable_fraction=1.0)


def test_plan_state_memory_matches_the_analytic_count(small_plan):
    """params x (4 bytes + 8 bytes of AdamW moments) / 8 shards + the replicated rest, within 5%."""
    m = _cfg().model
    D, F, V, L = m.d_model, m.d_ff, m.vocab_size, m.num_layers
    H = D // m.num_heads
    kernels = L * (D * m.num_heads * H * 2 + D * m.num_kv_heads * H * 2 + 3 * D * F) + 2 * V * D
    norms = L * 2 * D + D
    per_param = 4 + 8  # float32 master weight + AdamW's two float32 moments
    analytic = kernels * per_param / 8 + norms * per_param
    for est in small_plan.estimates:
        if est.candidate.strategy in ("fsdp", "fsdp_tp"):
            assert est.state_bytes == pytest.approx(analytic, rel=0.05), est.candidate
    dp = next(e for e in small_plan.estimates if e.candidate.strategy == "dp")
    assert dp.state_bytes == pytest.approx((kernels + norms) * per_param, rel=0.05)


def test_plan_fits_and_recommends(small_plan):
    by = {e.candidate.strategy: e for e in small_plan.estimates}
    assert not by["dp"].fits and by["fsdp"].fits
    # XLA's peak covers the state (argument + output aliased) and the activations
    assert by["fsdp"].peak_bytes >= by["fsdp"].state_bytes + by["fsdp"].temp_bytes
    assert by["fsdp"].compute_s > 0 and by["fsdp"].comm_s > 0
    best = small_plan.best
    assert best is not None and best.fits
    assert best.step_s == min(e.step_s for e in small_plan.estimates if e.fits)
    text = plan_lib.format_plan(small_plan)
    assert "recommendation: " + best.candidate.strategy in text
    assert "sharding.rules=" in text and "does not fit" in text


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return env


def test_plan_command_simulates_the_devices(tmp_path):
    """A fresh process: `--devices 4` makes 4 CPU devices before jax starts (the tests' own
    process has 8). One kv head rules tensor parallelism out: three candidates, dp, fsdp and
    two pipeline stages (8 microbatches of 2 sequences, one per fsdp device)."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "plan", "--config", "tiny", "--devices", "4",
         "--target", "tpu-v5e", "--device-memory", "1GB", "--remat", "full", *SMALL,
         "model.num_kv_heads=1"],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "plan: 2 layers x d_model 64, batch 16 x 16 tokens on 4 x tpu-v5e" in out
    rows = [line for line in out.splitlines() if line.startswith(("dp ", "fsdp", "pp "))]
    assert [r.split()[:4] for r in rows] == [["dp", "data=4", "full", "fits"],
                                             ["fsdp", "fsdp=4", "full", "fits"],
                                             ["pp", "stage=2", "x", "fsdp=2"]]
    assert rows[2].split()[4:6] == ["full", "fits"] and rows[2].endswith("  bubble 11.1%")
    assert not any("bubble" in r for r in rows[:2])
    assert "recommendation:" in out and "invalid" not in out


@pytest.mark.slow
def test_llama_8b_on_64_h100s_plans_within_minutes():
    """The docs' example (full remat only, the policy whose rows it checks): llama-8b on 64
    H100s; FSDP fits with full remat, data parallelism (90 GB of state per device) does not, and
    8 stages x fsdp 8 fit with the bubble of 32 microbatches."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "plan", "--config", "llama-8b", "--devices", "64",
         "--target", "h100", "--remat", "full"],
        capture_output=True, text=True, env=_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    dp = next(line for line in lines if line.startswith("dp ") and " full " in line)
    assert "does not fit (state 89.75 GiB + gradients 29.92 GiB per device)" in dp
    fsdp = next(line for line in lines if line.startswith("fsdp ") and " full " in line)
    assert " fits " in fsdp and "1.41 GiB" in fsdp  # 8.03B x 12 bytes / 64
    pp = next(line for line in lines if line.startswith("pp       stage=8 x fsdp=8 "))
    assert " fits " in pp and pp.endswith("  bubble 17.9%")  # 7 / (32 + 7)
    assert "recommendation:" in proc.stdout


def test_sparse_and_long_models_get_expert_and_sequence_candidates():
    h100 = roofline.TARGETS["h100"]
    moe = _cfg("model.moe.num_experts=4", "model.moe.top_k=2")
    got = {(c.strategy, c.label) for c in plan_lib.candidates(moe, 8, h100, ("full",))}
    assert {("ep", "fsdp=4 x expert=2"), ("ep", "fsdp=2 x expert=4")} <= got
    assert not any(s == "cp" for s, _ in got)
    long = _cfg(f"seq_len={plan_lib.LONG_SEQUENCE}", f"model.max_seq_len={plan_lib.LONG_SEQUENCE}")
    cands = plan_lib.candidates(long, 8, h100, ("full",))
    cp = [c for c in cands if c.strategy == "cp"]
    assert {c.label for c in cp} == {"fsdp=4 x sequence=2", "fsdp=2 x sequence=4", "sequence=8"}
    assert cp[0].overrides == ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "mesh.sequence=2",
                               "model.context_parallel=ring", "sharding.rules=auto",
                               "model.remat=full"]
    assert not any(c.strategy == "ep" for c in cands)


def test_expert_and_ring_candidates_are_priced_by_their_exchanges():
    """The ep candidate's step holds all-to-alls over the expert axis, the cp candidate's the
    ring's collective-permutes; both are costed in the comm time."""
    h100 = roofline.TARGETS["h100"]
    moe = _cfg("model.moe.num_experts=4", "model.moe.top_k=2")
    ep = next(c for c in plan_lib.candidates(moe, 8, h100, ("full",)) if c.strategy == "ep")
    est = plan_lib.evaluate(moe, ep, 8, h100, 1e12)
    assert est.fits and est.collective_bytes["all-to-all"] > 0 and est.comm_s > 0
    long = _cfg("seq_len=64", "batch_size=2")
    cp = plan_lib.Candidate("cp", (("fsdp", 2), ("sequence", 4)), "auto", "full",
                            plan_lib.PLANNED_AXES + ("sequence",), "ring")
    est = plan_lib.evaluate(long, cp, 8, h100, 1e12)
    assert est.fits and est.collective_bytes["collective-permute"] > 0


def test_pipeline_candidates_split_the_layers_and_the_batch():
    """Stages 2, 4, 8 dividing the layers and devices, fsdp the rest, 1f1b with the most
    microbatches (of 4S, 2S, S) whose sequences the fsdp devices share evenly."""
    h100 = roofline.TARGETS["h100"]
    cands = plan_lib.candidates(_cfg("model.num_layers=8"), 8, h100, ("full", "none"))
    pp = {c.label: c for c in cands if c.strategy == "pp"}
    assert set(pp) == {"stage=2 x fsdp=4", "stage=4 x fsdp=2", "stage=8"}
    # batch 16: 16/16 = 1 sequence cannot feed 4 (or 2) fsdp devices, 16/4 = 4 (or 16/8 = 2) can
    assert {k: c.microbatches for k, c in pp.items()} == {
        "stage=2 x fsdp=4": 4, "stage=4 x fsdp=2": 8, "stage=8": 16}
    assert pp["stage=4 x fsdp=2"].overrides == [
        "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.stage=4", "pipeline.schedule=1f1b",
        "pipeline.microbatches=8", "sharding.rules=auto", "model.remat=none"]
    assert sum(c.strategy == "pp" for c in cands) == 3 * 2  # every layout with both policies
    assert not any("stage" in o for c in cands if c.strategy != "pp" for o in c.overrides)
    assert pp["stage=8"].mesh == (("stage", 8),)
    # 6 sequences: no M of 4S, 2S or S divides them into shares for every fsdp device
    assert not any(c.strategy == "pp" for c in plan_lib.candidates(_cfg("batch_size=6"), 8, h100))
    for unpipelined in (_cfg("model.scan_layers=false"),
                        _cfg("model.moe.num_experts=4", "model.moe.top_k=2"),
                        _cfg("model.num_layers=1")):
        assert not any(c.strategy == "pp" for c in plan_lib.candidates(unpipelined, 8, h100))
    # a pipelined config's other candidates are evaluated unpipelined (mesh.stage reset to 1;
    # fsdp=8 x stage=2 would ask for 16 devices), here rejected before compiling
    staged = _cfg("mesh.stage=2", "pipeline.microbatches=4")
    fsdp = next(c for c in cands if c.strategy == "fsdp")
    est = plan_lib.evaluate(staged, fsdp, 8, h100, limit_bytes=1)
    assert est.status.startswith("does not fit (state") and est.bubble == 0


def test_pipeline_estimate_stretches_the_compute_by_the_bubble():
    """A bfloat16 pp candidate (2 stages x fsdp 4, 4 microbatches) compiles; its bubble is the
    schedule's, its compute waits out the bubble, and its backward recomputes the stage."""
    cfg = _cfg("model.dtype=bfloat16")
    h100 = roofline.TARGETS["h100"]
    pp = next(c for c in plan_lib.candidates(cfg, 8, h100, ("full",)) if c.strategy == "pp")
    est = plan_lib.evaluate(cfg, pp, 8, h100, 1e12)
    assert est.fits and pp.microbatches == 4 and est.compute_s > 0
    assert est.bubble == pytest.approx(pipeline.bubble_formula(2, 4, 1)) == pytest.approx(0.2)
    assert est.step_s >= est.compute_s / (1 - est.bubble) - 1e-15
    unpipelined, model_s = roofline.compute_seconds(cfg, "full", 8, h100)
    assert est.compute_s > unpipelined and est.model_s == model_s  # the stage forward, again
    # the stage-to-stage sends are the tick loop's collective-permutes, priced once
    assert 0 < est.stage_bytes <= est.collective_bytes["collective-permute"]
    assert plan_lib.format_row(est).endswith("  bubble 20.0%")
    plain = plan_lib.Estimate(pp, "fits", compute_s=2.0, comm_s=1.0)  # no bubble: as before
    assert plain.step_s == 2.0 and "bubble" not in plan_lib.format_row(plain)


# A tick loop of 6 ticks (1f1b over 2 stages with 2 microbatches: each stage runs 2 forward and
# 2 backward ticks) whose forward branch runs a 3-layer loop with one all-gather per layer.
PIPELINED = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%layer (p.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.2 = (s32[], f32[8]{0}) parameter(0)
  %x.2 = f32[8]{0} get-tuple-element(%p.2), index=1
  %all-gather.1 = f32[32]{0} all-gather(%x.2), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t.2 = (s32[], f32[8]{0}) tuple(%x.2, %x.2)
}

%layer_cond (p.3: (s32[], f32[8])) -> pred[] {
  %p.3 = (s32[], f32[8]{0}) parameter(0)
  ROOT %c.3 = pred[] constant(true)
}

%idle (p.4: (s32[], f32[8])) -> (s32[], f32[8]) {
  ROOT %p.4 = (s32[], f32[8]{0}) parameter(0)
}

%forward (p.5: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.5 = (s32[], f32[8]{0}) parameter(0)
  ROOT %while.5 = (s32[], f32[8]{0}) while(%p.5), condition=%layer_cond, body=%layer, backend_config={"known_trip_count":{"n":"3"}}
}

%tick (p.6: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.6 = (s32[], f32[8]{0}) parameter(0)
  %code = s32[] get-tuple-element(%p.6), index=0
  %x.6 = f32[8]{0} get-tuple-element(%p.6), index=1
  %permute.6 = f32[8]{0} collective-permute(%x.6), channel_id=2, source_target_pairs={{0,4},{1,5},{2,6},{3,7}}
  ROOT %conditional.6 = (s32[], f32[8]{0}) conditional(%code, %p.6, %p.6, %p.6), branch_computations={%idle, %forward, %idle}
}

%tick_cond (p.7: (s32[], f32[8])) -> pred[] {
  %p.7 = (s32[], f32[8]{0}) parameter(0)
  ROOT %c.7 = pred[] constant(true)
}

ENTRY %main (param.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %param.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %while.1 = (s32[], f32[8]{0}) while(%param.1), condition=%tick_cond, body=%tick, backend_config={"known_trip_count":{"n":"6"}}
}
"""  # noqa: E501  (HLO instructions are long lines)


def test_pipeline_trips_count_the_layers_in_the_ticks_that_run_them():
    table = pipeline.schedule_timetable("1f1b", 2, 2)
    assert table.ticks == 6 and (table.code[:, 0] == pipeline.FORWARD).sum() == 2
    found = hlo.collectives(PIPELINED, 8)
    assert {c.name: c.trips for c in found} == {"all-gather.1": 3, "permute.6": 6}
    counted = {c.name: c.trips for c in roofline.pipeline_trips(PIPELINED, found, table)}
    assert counted == {"all-gather.1": 3 * 2, "permute.6": 6}  # 3 layers x 2 forward ticks


# --------------------------------------------------------------------------------------------
# Image models: ViT's blocks are priced like the decoder's; CNNs have no remat and no tensor
# candidates, and their FLOPs come from the classify task's formula.

def test_vit_candidates_and_recompute():
    from jaxscale.models.vit import forward_macs

    cfg = config_lib.load("vit-digits", ["batch_size=16"])
    h100 = roofline.TARGETS["h100"]
    got = {(c.strategy, c.label) for c in plan_lib.candidates(cfg, 8, h100, ("full",))}
    # 4 heads, an MLP of 128 and 10 classes: tensor=2 only; no experts, sequence or stages
    assert got == {("dp", "data=8"), ("fsdp", "fsdp=8"), ("fsdp_tp", "fsdp=4 x tensor=2")}
    per_example = 6 * forward_macs(cfg.model, (16, 16, 1))
    none, model_s = roofline.compute_seconds(cfg, "none", 8, h100, flops_per_example=per_example)
    full, _ = roofline.compute_seconds(cfg, "full", 8, h100, flops_per_example=per_example)
    assert none == model_s == pytest.approx(16 * per_example / 8 / 989e12)
    # full remat reruns each block's q/k/v, attention (bidirectional: both halves), out and
    # MLP-in matmuls for the 16 patch tokens (mean-pooled: no class token)
    D, F, T, L = 64, 128, 16, 4
    rerun = L * T * (2 * D * 3 * D + 4 * T * D + 2 * D * D + 2 * D * F)
    assert full == pytest.approx(16 * (per_example + rerun) / 8 / 989e12)


@pytest.fixture(scope="module")
def resnet_plan():
    return plan_lib.plan(config_lib.load("resnet-digits", ["batch_size=16"]), 8, "h100")


def test_a_cnn_is_planned_without_remat_or_tensor_candidates(resnet_plan):
    from jaxscale.models.resnet import forward_macs

    got = [(e.candidate.strategy, e.candidate.label, e.candidate.remat)
           for e in resnet_plan.estimates]
    assert got == [("dp", "data=8", ""), ("fsdp", "fsdp=8", "")]
    per_example = 6 * forward_macs(resnet_plan.cfg.model, (16, 16, 1))
    for e in resnet_plan.estimates:
        assert e.fits and e.peak_bytes >= e.state_bytes + e.temp_bytes
        assert e.compute_s == e.model_s == pytest.approx(16 * per_example / 8 / 989e12)
        assert not any(o.startswith("model.remat") for o in e.candidate.overrides)
    dp, fsdp = resnet_plan.estimates
    # AdamW: parameters and two moments, replicated by dp; fsdp splits the kernels 8 ways and
    # keeps the norms' vectors whole
    assert 6 * fsdp.state_bytes < dp.state_bytes < 8 * fsdp.state_bytes
    text = plan_lib.format_plan(resnet_plan)
    assert text.startswith("plan: model.name=resnet, batch 16 x 16x16x1 on 8 x h100 ")
    recommendation = text.split("recommendation: ")[1]
    best = resnet_plan.best.candidate
    assert recommendation.startswith(f"{best.strategy} {best.label}: about ")
    assert " examples/s at " in recommendation and "remat" not in recommendation


def test_remat_policies_for_a_model_without_a_remat_setting():
    with pytest.raises(ConfigError) as e:
        plan_lib.plan(config_lib.load("resnet-digits"), 8, remats=("full",))
    assert str(e.value) == ("--remat full: model.name=resnet has no remat setting; leave "
                            "--remat out")
