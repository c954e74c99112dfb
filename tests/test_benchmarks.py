"""The benchmarks: the GPU benchmark's exact script (scripts/gpu_benchmark.sh), run on the CPU
with a tiny model (the same code path that produced the GPU numbers in benchmarks/RESULTS.md);
the CPU benchmarks at a tiny size; and that every benchmark gets its steps from the one run
builder (`jaxscale.run.build`) rather than writing that wiring out again."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# The build wiring's pieces: only jaxscale/run/build.py puts them together.
WIRING = {"make_train_step", "jit_step", "init_state", "abstract_state", "state_shardings",
          "resolve_rules"}


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



@pytest.mark.slow
def test_gpu_speed_check_script_runs_every_form_tiny_on_cpu(tmp_path):
    """scripts/gpu_speed_check.sh, the GPU session's one call, on the CPU: every form of the
    same candidate ran, and the forms table sets each against the scanned one."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_speed_check.sh"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "tiny"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["form"], r["status"]) for r in rows] == [
        ("scan", "ok"), ("scan_unroll2", "ok"), ("unrolled", "ok"), ("unchunked_loss", "ok")]
    assert rows[1]["overrides"][-1] == "model.scan_unroll=2"
    assert rows[3]["overrides"][-1] == "loss.chunked=never"
    forms = (out / "table.md").read_text().split("\n\n")[1].splitlines()
    assert forms[0].startswith("| model | seq | batch | remat | scan step (ms) |")
    (row,) = forms[2:]
    ratios = [float(cell.split(",")[1]) for cell in row.split("|")[6:9]]
    steps = {r["form"]: r["step_s"] for r in rows}
    assert ratios == [round(steps[f] / steps["scan"], 3)
                      for f in ("scan_unroll2", "unrolled", "unchunked_loss")]

@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_benchmark_gets_its_steps_from_build(path):
    """No benchmark imports or calls a piece of the build wiring; `run.init_state()` (the built
    run's own method) is the one use of those names allowed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [f"import {a.name}" for a in node.names if a.name in WIRING]
        elif isinstance(node, ast.Name) and node.id in WIRING:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in WIRING:
            owner = node.value
            if not (node.attr == "init_state" and (
                    isinstance(owner, ast.Name) and owner.id == "run"
                    or isinstance(owner, ast.Attribute) and owner.attr == "run")):
                found.append(f"{ast.unparse(node)}")
    assert not found, f"{path.name} writes the build wiring out (use jaxscale.run.build): {found}"


def _run_benchmark(name: str, *args: str, timeout: int = 600) -> str:
    # Each benchmark sets its own device count before jax starts; keep the suite's fast compiles.
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
                          cwd=BENCHMARKS, capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_step_overhead_tiny_trains_the_same_model_on_both_sides():
    out = _run_benchmark("step_overhead", "--steps", "10", "--warmup", "1", "--layers", "1",
                         "--d-model", "32", "--d-ff", "64", "--seq", "32", "--batch", "8")
    first = re.search(r"loss, first step: jaxscale ([0-9.]+), hand ([0-9.]+); after \d+ steps: "
                      r"jaxscale ([0-9.]+), hand ([0-9.]+)", out)
    assert first, out
    js0, hand0, js1, hand1 = map(float, first.groups())
    assert js0 == pytest.approx(hand0, rel=1e-5) and js1 < js0 and hand1 < hand0
    assert re.search(r"^ratio: [0-9.]+$", out.strip().splitlines()[-1]), out
    # The non-finite guard keeps no second copy of the state: jaxscale's temporaries are the
    # hand-written step's plus its metrics' scalars (1,040 bytes here; the select the guard
    # used to be kept 6,320: a copy of the parameters and Adam moments).
    js_temp, hand_temp = map(int, re.search(r"\((\d+) and (\d+) bytes\)", out).groups())
    assert js_temp <= hand_temp + 2048, (js_temp, hand_temp)


TINY = ["model.num_layers=1", "model.d_model=32", "model.d_ff=64", "batch_size=8", "seq_len=32"]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, expect", [
    pytest.param("scan_vs_unrolled", ["--quick", "--layers", "2"],
                 r"^\| 2 \| [0-9.]+ \| [0-9.]+ \|", id="scan_vs_unrolled"),
    pytest.param("checkpoint_overhead", ["--every", "2", "--rounds", "2", *TINY],
                 r"^ratio: [0-9.]+$", id="checkpoint_overhead"),
    pytest.param("sparse_and_long", ["--quick", "--steps", "1"],
                 r"^\| ring, sequence \| tiny \| sequence=8 \| [0-9.]+ \|", id="sparse_and_long"),
    pytest.param("pipeline_schedules", ["--quick", "--steps", "2"],
                 r"^\| 1f1b \| data=2 x stage=4 \| 1f1b \| 8 \| 1 \| [0-9.]+ \|",
                 id="pipeline_schedules"),
    pytest.param("moe_vs_dense", ["--steps", "2", "--eval-batches", "1", "seq_len=32",
                                  "batch_size=16", "model.num_layers=1", "model.d_model=32",
                                  "model.d_ff=64", "model.moe.d_ff=32"],
                 r"^\| tiny-moe \| [0-9,]+ \| [0-9,]+ \|", id="moe_vs_dense"),
    pytest.param("data_throughput", ["--sources", "synthetic", "--batches", "5", "--steps", "2",
                                     "--repeats", "1", *TINY], r"^\| synthetic \| [0-9.]+ \|",
                 id="data_throughput"),
    pytest.param("generate_decode", ["--quick", "--steps", "2", "--batches", "8",
                                     "model.num_layers=1"],
                 r"^\| tiny \| fsdp=8 \| 8 \| 8 \| 128 \| 64 \| [0-9.]+ \| [0-9.]+ \|",
                 id="generate_decode"),
    pytest.param("chunked_loss", ["--quick", "--steps", "1"],
                 r"^\| chunked \| [0-9.]+ \([0-9.-]+\) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| "
                 r"[0-9.]+ \|$",
                 id="chunked_loss"),
    pytest.param("vision_throughput", ["--quick"],
                 r"^\| vit-digits \| fsdp=4 x tensor=2 \| [0-9.]+ \| [0-9.-]+ \| [0-9,]+ \| "
                 r"[0-9.]+ \| [0-9.]+% \|$", id="vision_throughput"),
])
def test_cpu_benchmark_runs_tiny(name, args, expect, tmp_path):
    if name == "checkpoint_overhead":
        args = ["--dir", str(tmp_path), *args]
    out = _run_benchmark(name, *args)
    assert re.search(expect, out, flags=re.M), out
