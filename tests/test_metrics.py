"""FLOPs per token by hand and by XLA, MFU, peaks, and the JSONL writer."""

import json

import jax
import numpy as np
import pytest
from util import random_batch

from jaxscale import config as config_lib
from jaxscale.analysis import metrics
from jaxscale.config import MeshConfig, OptimConfig
from jaxscale.core import optim, sharding, step
from jaxscale.core.mesh import make_mesh
from jaxscale.models import build_model
from jaxscale.run import build


def test_flops_gpt2_small_by_hand():
    # L=12, D=768, N=K=12, H=64, F=3072, V=50304, GELU (2 MLP matmuls), T=1024.
    # per layer: attention 4 * 768 * 768 = 2,359,296; MLP 2 * 768 * 3072 = 4,718,592
    # N_mm = 12 * 7,077,888 + 768 * 50304 = 84,934,656 + 38,633,472 = 123,568,128
    # attention: 12 * L * T * N * H = 12 * 12 * 1024 * 768 = 113,246,208
    f = metrics.flops_per_token(config_lib.load("gpt2-small").model, 1024)
    assert f.matmul_params == 123_568_128
    assert f.noncausal_per_token == 6 * 123_568_128 + 113_246_208 == 854_654_976
    assert f.causal_per_token == 6 * 123_568_128 + 113_246_208 // 2 == 798_031_872


def test_flops_llama_8b_by_hand():
    # L=32, D=4096, N=32, K=8, H=128, F=14336, V=128256, SwiGLU (3 MLP matmuls), T=8192.
    # attention per layer: 4096*4096 + 2*4096*1024 + 4096*4096 = 41,943,040
    # MLP per layer: 3 * 4096 * 14336 = 176,160,768
    # N_mm = 32 * 218,103,808 + 4096 * 128256 = 6,979,321,856 + 525,336,576 = 7,504,658,432
    # attention: 12 * 32 * 8192 * 4096 = 12,884,901,888
    f = metrics.flops_per_token(config_lib.load("llama-8b").model, 8192)
    assert f.matmul_params == 7_504_658_432
    assert f.causal_per_token == 6 * 7_504_658_432 + 12_884_901_888 // 2 == 51_470_401_536
    assert f.noncausal_per_token == 6 * 7_504_658_432 + 12_884_901_888 == 57_912_852_480


def test_flops_agree_with_xla_cost_analysis():
    """XLA's count for the compiled step is within 10% of the formula (non-causal: XLA computes
    every attention score). Layers are unrolled: XLA counts a loop body once, not per trip."""
    model_cfg = config_lib.ModelConfig(num_layers=2, d_model=256, num_heads=4, d_ff=1024,
                                       vocab_size=256, max_seq_len=128, remat="none",
                                       scan_layers=False)
    model = build_model(model_cfg)
    tx = optim.make_optimizer(OptimConfig(warmup_steps=0), 10)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    rules = sharding.resolve_rules("dp")
    st, shardings = build.init_state(model, tx, mesh, rules, seq_len=128)
    fn = step.jit_step(build.make_train_step(model, tx, mesh=mesh, rules=rules), shardings,
                       sharding.batch_sharding(mesh, rules))
    batch = random_batch(8, 128, 256)
    compiled = fn.lower(st, batch, jax.random.key(0)).compile()
    xla = metrics.compiled_stats(compiled).flops
    formula = metrics.flops_per_token(model_cfg, 128).noncausal_per_token * 8 * 128
    assert xla == pytest.approx(formula, rel=0.10)


def test_mfu_formula():
    assert metrics.mfu(1000.0, 1e9, 4, 1e12) == pytest.approx(1000 * 1e9 / (4 * 1e12))


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
])
def test_known_peaks(kind, peak):
    assert metrics._known_peak(kind) == peak


def test_cpu_peak_is_the_best_rate_measured(tmp_path, monkeypatch):
    """Measured once per process; the record keeps the best rate, so a run on a busy machine
    (a low measurement) still divides by the machine's peak."""
    monkeypatch.setattr(metrics, "_CACHE", tmp_path)
    rates = iter([5e10, 2e10, 6e10])
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: calls.append(1) or next(rates))
    metrics.cpu_peak_flops.cache_clear()
    try:
        assert metrics.cpu_peak_flops() == 5e10
        assert metrics.cpu_peak_flops() == 5e10 and calls == [1]  # once per process
        # Simulated devices share the machine's peak.
        assert metrics.peak_flops_per_device() == 5e10 / jax.local_device_count()
        record = tmp_path / "cpu_peak.json"
        for measured, best in ((2e10, 5e10), (6e10, 6e10)):  # later processes
            metrics.cpu_peak_flops.cache_clear()
            assert metrics.cpu_peak_flops() == best, measured
            assert list(json.loads(record.read_text()).values()) == [best]
        (key,) = json.loads(record.read_text())
        assert key.endswith(f"-jax{jax.__version__}")
    finally:
        metrics.cpu_peak_flops.cache_clear()


def test_cpu_peak_drops_an_impossible_rate(tmp_path, monkeypatch):
    """A reading above 1 TFLOP/s per core (a timing error) is neither used nor recorded, and a
    record of one is replaced by the next real measurement."""
    monkeypatch.setattr(metrics, "_CACHE", tmp_path)
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 2)
    record = tmp_path / "cpu_peak.json"
    rates = iter([5e10, 6.8e14, 4e10])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: next(rates))
    metrics.cpu_peak_flops.cache_clear()
    try:
        assert metrics.cpu_peak_flops() == 5e10
        metrics.cpu_peak_flops.cache_clear()
        assert metrics.cpu_peak_flops() == 5e10  # the 6.8e14 reading dropped
        assert list(json.loads(record.read_text()).values()) == [5e10]
        (key,) = json.loads(record.read_text())
        record.write_text(json.dumps({key: 6.8e14}))  # a record written before the ceiling
        metrics.cpu_peak_flops.cache_clear()
        assert metrics.cpu_peak_flops() == 4e10
        assert json.loads(record.read_text()) == {key: 4e10}
    finally:
        metrics.cpu_peak_flops.cache_clear()


def test_measured_matmul_rate_is_plausible():
    rate = metrics.measure_matmul_flops(size=256, repeats=3)
    assert 1e8 < rate < 1e14


def test_jsonl_writer_and_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = metrics.JsonlWriter(path)
    writer.write({"step": 1, "loss": np.float32(2.5), "mfu": float("nan")})
    writer.write({"step": 2, "loss": 2.0})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    records = metrics.read_jsonl(path)
    assert records == [{"step": 1, "loss": 2.5, "mfu": "nan"}, {"step": 2, "loss": 2.0}]


def test_jsonl_writer_drops_records_a_resumed_run_repeats(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = metrics.JsonlWriter(path)
    for n in (2, 4, 6):
        writer.write({"step": n, "loss": float(n)})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # killed mid-line after step 6
    # Resumed from the checkpoint of step 4: steps 6 and 8 will be trained again.
    writer = metrics.JsonlWriter(path, keep_through=4)
    writer.write({"step": 6, "loss": 6.5})
    writer.close()
    assert metrics.read_jsonl(path) == [
        {"step": 2, "loss": 2.0}, {"step": 4, "loss": 4.0}, {"step": 6, "loss": 6.5}]
    # A fresh run (nothing to resume) starts an empty file.
    metrics.JsonlWriter(path).close()
    assert path.read_text() == ""
