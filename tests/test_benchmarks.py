"""The GPU benchmark's exact script (scripts/gpu_benchmark.sh), run on the CPU with a tiny model:
the same code path that produced the GPU numbers in benchmarks/RESULTS.md."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_tiny_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_benchmark.sh"), "--tiny", "--remats", "full",
         "--batches", "4", "--warmup", "1", "--steps", "2", "--windows", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["model"], r["batch"], r["remat"], r["status"]) for r in rows] == [
        ("tiny", 4, "full", "ok")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < r["mfu_noncausal"] < 1
        assert r["attention"] == "xla" and r["peak_bytes"] > r["temp_bytes"] > 0
        assert r["date"] and r["device"] == "cpu"
    log = (tmp_path / "log").read_text()
    assert log.count("attention check") == 2 and "FAIL" not in log
    assert "ms per step" in (tmp_path / "profile_tiny.txt").read_text()
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| model | seq | batch | remat |") and table.count("| tiny |") == 1
