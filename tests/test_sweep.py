"""Sweeps: spec expansion and its errors, the manifest, the local, Ray and SLURM executors, and
resuming a sweep (finished points skipped, an interrupted one continued from its checkpoint),
also after a kill -9 of the sweep process."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from jaxscale import config as config_lib
from jaxscale.analysis.metrics import flops_per_token
from jaxscale.errors import ConfigError
from jaxscale.scaling import sweep

# The smallest runs that still checkpoint mid-way and end with an evaluation.
TINY_RUN = ["steps=4", "model.num_layers=1", "model.d_model=32", "seq_len=16", "batch_size=8",
            "eval_every=4", "eval_batches=1", "checkpoint.every=2", "log_every=1"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep.add_parser(parser.add_subparsers())
    return parser.parse_args(["sweep", *argv])


def _write_spec(tmp_path: pathlib.Path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _error(spec: dict) -> str:
    with pytest.raises(ConfigError) as e:
        sweep.expand(spec)
    return str(e.value)


def _n(overrides: list[str]) -> int:
    cfg = config_lib.load("tiny", overrides)
    return flops_per_token(cfg.model, cfg.seq_len).matmul_params


def test_grid_then_points_in_order():
    s = sweep.expand({"base": "tiny", "overrides": ["steps=20"],
                      "grid": {"model.d_model": [32, 64], "model.num_layers": [2, 4]},
                      "points": [["model.d_model=96"], {"model.d_model": 96, "seed": 1},
                                 ["model.d_model=96"]]})
    assert [p.name for p in s.points] == [
        "d_model=32-num_layers=2", "d_model=32-num_layers=4", "d_model=64-num_layers=2",
        "d_model=64-num_layers=4", "d_model=96", "d_model=96-seed=1", "d_model=96-2"]
    assert s.points[1].own == ("model.d_model=32", "model.num_layers=4")
    assert s.points[1].overrides == ("steps=20", "model.d_model=32", "model.num_layers=4")
    assert [p.steps for p in s.points] == [20] * 7
    n = _n(["model.d_model=32", "model.num_layers=4"])
    assert s.points[1].flops == 6.0 * n * 20 * 32 * 128  # tiny: batch 32 x 128 tokens


def test_isoflop_steps_from_6nd_and_small_points_dropped():
    common = ["seq_len=64", "batch_size=16", "model.num_layers=2"]
    sizes = [["model.d_model=32", "model.d_ff=96"], ["model.d_model=64", "model.d_ff=192"]]
    s = sweep.expand({"base": "tiny", "overrides": common, "min_steps": 10,
                      "isoflop": {"budgets": [2e11, 4e9], "sizes": sizes}})
    n_small, n_big = _n(common + sizes[0]), _n(common + sizes[1])
    assert (n_small, n_big) == (32768, 114688)
    steps = [round(2e11 / (6 * n_small * 16 * 64)), round(2e11 / (6 * n_big * 16 * 64)),
             round(4e9 / (6 * n_small * 16 * 64))]
    assert steps == [993, 284, 20]  # 4e9 on the big size: 5.7 steps, dropped
    assert [(p.name, p.steps) for p in s.points] == [
        ("C=2e+11-d_model=32-d_ff=96", 993), ("C=2e+11-d_model=64-d_ff=192", 284),
        ("C=4e+09-d_model=32-d_ff=96", 20)]
    assert s.points[1].overrides[-3:] == ("steps=284", "eval_every=284", "checkpoint.every=71")
    assert s.points[1].flops == pytest.approx(2e11, rel=2e-3)
    assert [p.budget for p in s.points] == [2e11, 2e11, 4e9]  # what `jaxscale fit` groups by
    assert s.notes == ("dropped C=4e+09-d_model=64-d_ff=192: 6 steps < min_steps=10",)
    grid_sizes = sweep.expand({"base": "tiny", "overrides": common, "isoflop": {
        "budgets": [2e11], "sizes": {"model.d_model": [32, 64], "model.d_ff": [96]}}})
    assert [p.steps for p in grid_sizes.points] == [993, round(2e11 / (6 * _n(
        common + ["model.d_model=64", "model.d_ff=96"]) * 16 * 64))]


def test_isoflop_with_no_point_left():
    assert _error({"base": "tiny", "isoflop": {"budgets": [1e6], "sizes": [["seed=0"]]}}) == (
        "sweep spec: every isoflop point has fewer than min_steps=10 steps; raise the budgets "
        "or shrink the sizes")


def test_unknown_config_key_is_the_configs_own_error_prefixed_with_the_point():
    msg = _error({"base": "tiny", "overrides": ["steps=20"],
                  "grid": {"model.d_model": [32], "seed": [0, 1]},
                  "points": [["model.d_modle=32"]]})
    with pytest.raises(ConfigError) as own:
        config_lib.load("tiny", ["steps=20", "model.d_modle=32"])
    assert msg == f"sweep point 3 (model.d_modle=32): {own.value}"
    assert msg.startswith("sweep point 3 (model.d_modle=32): unknown config key "
                          "'model.d_modle' (did you mean 'd_model'?); valid keys in 'model': ")
    assert "\n" not in msg


@pytest.mark.parametrize("spec, message", [
    ({"base": "tiny", "grid": {}}, "sweep spec: grid is empty; give each key a non-empty list "
                                   "of values, e.g. {model.d_model: [32, 64]}"),
    ({"base": "tiny", "grid": {"seed": []}},
     "sweep spec: grid key 'seed' needs a non-empty list of values, got []"),
    ({"base": "tiny", "gird": {"seed": [1]}},
     "sweep spec: unknown key 'gird' (did you mean 'grid'?); valid keys: base, overrides, grid, "
     "points, isoflop, min_steps"),
    ({"base": "tiny", "isoflop": {"budget": [1e12], "sizes": [["seed=0"]]}},
     "sweep spec: unknown key 'isoflop.budget' (did you mean 'budgets'?); valid keys: budgets, "
     "sizes"),
    ({"base": "tiny", "isoflop": {"budgets": [1e12], "sizes": [["seed=0"]]}, "points": [[]]},
     "sweep spec: isoflop takes the place of grid and points; give one"),
    ({"grid": {"seed": [1]}}, "sweep spec: 'base' is missing: name a preset or a config YAML"),
    ({"base": "tiny"}, "sweep spec: no points: give grid, points or isoflop"),
    ({"base": "tiny", "overrides": ["workdir=x"], "grid": {"seed": [1]}},
     "sweep spec: workdir is set per point (SWEEP_DIR/<name>); drop the workdir override and "
     "pass --dir"),
    ({"base": "tiny", "points": ["seed=1"]}, "sweep spec: points[0] must be a list of key=value "
                                             "strings or a mapping, got 'seed=1'"),
])
def test_spec_errors(spec, message):
    assert _error(spec) == message


def test_spec_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.find_spec("tiny-grid") == sweep.SWEEPS_DIR / "tiny-grid.yaml"
    assert sweep.find_spec("configs/sweeps/tiny-grid.yaml") == sweep.SWEEPS_DIR / "tiny-grid.yaml"
    with pytest.raises(ConfigError) as e:
        sweep.find_spec("tiny-gird")
    assert str(e.value) == ("sweep spec 'tiny-gird' is neither a file nor a shipped spec; "
                            "shipped: resnet-compound, tiny-grid, tiny-isoflop "
                            "(did you mean 'tiny-grid'?)")
    with pytest.raises(ConfigError) as e:
        sweep.cmd_sweep(_args("tiny-grid", "--dir", "d", "--workers", "0"))
    assert str(e.value) == "--workers 0 must be at least 1"


def test_shipped_specs():
    iso = sweep.expand(sweep.load_spec("tiny-isoflop"))
    assert len(iso.points) == 9 and iso.notes == ()
    by_budget = {}
    for p in iso.points:
        by_budget.setdefault(p.name.partition("-")[0], []).append(p.flops)
    assert list(by_budget) == ["C=8e+10", "C=2e+11", "C=5e+11"]
    for name, flops in by_budget.items():  # each point's 6ND within 0.5% of its budget
        assert flops == pytest.approx([float(name[2:])] * 3, rel=5e-3)
    assert sum(p.steps for p in iso.points) == 12111
    grid = sweep.expand(sweep.load_spec("tiny-grid"))
    assert [p.steps for p in grid.points] == [20] * 4
    compound = sweep.expand(sweep.load_spec("resnet-compound"))
    assert len({p.name for p in compound.points}) == 7
    scales = [config_lib.load("resnet-digits", p.overrides).model.scale for p in compound.points]
    assert [(s.phi, s.alpha, s.beta, s.gamma) for s in scales[1:]] == [
        (1, 2, 1, 1), (2, 2, 1, 1), (1, 1, 1.414, 1), (2, 1, 1.414, 1), (1, 1, 1, 1.414),
        (2, 1, 1, 1.414)]
    assert scales[0].phi == 0


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert sweep.cmd_sweep(_args("tiny-grid", "--dir", str(tmp_path / "d"), "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    flops = 6.0 * _n(["model.d_model=32", "model.num_layers=2"]) * 20 * 32 * 128
    assert lines[0].split()[:7] == ["1", "pending", "d_model=32-num_layers=2", "steps", "20",
                                    "FLOPs", f"{flops:.3g}"]
    assert not (tmp_path / "d").exists()


def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    spec = _write_spec(tmp_path, {"base": "tiny", "points": [TINY_RUN]})
    with pytest.raises(ConfigError) as e:
        sweep.cmd_sweep(_args(spec, "--dir", str(tmp_path / "d"), "--executor", "ray"))
    assert str(e.value) == "executor=ray needs ray: pip install 'jaxscale[ray]'"


def test_slurm_array_of_pending_points(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "sw"
    done = d / "d_model=32-num_layers=2"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"steps": 20}))
    args = _args("tiny-grid", "--dir", str(d), "--executor", "slurm", "--cpus-per-point", "4",
                 "--gpus-per-point", "1")
    assert sweep.cmd_sweep(args) == 0
    assert capsys.readouterr().out == f"submit with: sbatch {d / 'sweep.sbatch'}\n"
    script = (d / "sweep.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-2" in script
    assert "#SBATCH --cpus-per-task=4" in script and "#SBATCH --gpus-per-task=1" in script
    names = ["d_model=32-num_layers=4", "d_model=64-num_layers=2", "d_model=64-num_layers=4"]
    expected = []
    for name in names:
        d_model, layers = (part.partition("=")[2] for part in name.split("-"))
        cmd = ["jaxscale", "train", "--config", "tiny", "steps=20", f"model.d_model={d_model}",
               f"model.num_layers={layers}", f"workdir={d / name}"]
        expected.append(f"{shlex.join(cmd)} >> {shlex.quote(str(d / name))}/train.log 2>&1")
    assert (d / "points.txt").read_text().splitlines() == expected
    statuses = [p["status"] for p in json.loads((d / "manifest.json").read_text())["points"]]
    assert statuses == ["done", "pending", "pending", "pending"]


def _summary(d: pathlib.Path, name: str) -> dict:
    return json.loads((d / name / "summary.json").read_text())


@pytest.fixture()
def point_env(monkeypatch):
    """Points on one CPU device each (the suite's 8 would only slow them), and the suite's fast
    compile flag, the same for every executor."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_local_sweep_failure_skip_and_resume(tmp_path, point_env, capsys, monkeypatch):
    """Two points train and one fails at run time (validation cannot see a missing data
    directory); a rerun skips the finished point, continues the one whose last checkpoint and
    summary were lost (as a kill -9 leaves it) from step 2, to the same final loss bitwise."""
    monkeypatch.chdir(tmp_path)
    spec = _write_spec(tmp_path, {"base": "tiny", "overrides": TINY_RUN, "points": [
        ["seed=0"], ["seed=1"], ["data.path=missing-corpus"]]})
    d = tmp_path / "sw"
    assert sweep.cmd_sweep(_args(spec, "--dir", str(d), "--workers", "2")) == 1
    manifest = json.loads((d / "manifest.json").read_text())
    assert [(p["name"], p["status"]) for p in manifest["points"]] == [
        ("seed=0", "done"), ("seed=1", "done"), ("path=missing-corpus", "failed")]
    failed = manifest["points"][2]
    assert failed["exit_code"] == 2 and "missing" in failed["error_tail"]
    assert manifest["points"][0]["exit_code"] == 0 and manifest["points"][0]["wall_s"] > 0
    first = {name: _summary(d, name) for name in ("seed=0", "seed=1")}
    assert [s["steps"] for s in first.values()] == [4, 4]
    assert first["seed=0"]["final_loss"] != first["seed=1"]["final_loss"]
    assert all(s["final_eval_loss"] is not None for s in first.values())
    assert capsys.readouterr().err.splitlines()[-1] == "sweep: 2/3 done, 1 failed, 0 running"

    log0 = (d / "seed=0" / "train.log").read_text()
    (d / "seed=1" / "summary.json").unlink()
    shutil.rmtree(d / "seed=1" / "checkpoints" / "4")
    assert sweep.cmd_sweep(_args(spec, "--dir", str(d), "--workers", "2")) == 1
    assert (d / "seed=0" / "train.log").read_text() == log0  # not rerun
    assert "checkpoint: resumed from step 2" in (d / "seed=1" / "train.log").read_text()
    assert _summary(d, "seed=1")["final_loss"] == first["seed=1"]["final_loss"]
    assert _summary(d, "seed=0") == first["seed=0"]
    again = json.loads((d / "manifest.json").read_text())["points"]
    assert [p["status"] for p in again] == ["done", "done", "failed"]
    assert again[0]["wall_s"] == manifest["points"][0]["wall_s"]  # kept from the first run
    assert "sweep: 1 of 3 points already done" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_matches_local_bitwise(tmp_path, point_env):
    ray = pytest.importorskip("ray", reason="executor=ray needs ray (pip install 'jaxscale[ray]')")
    spec = _write_spec(tmp_path, {"base": "tiny", "overrides": TINY_RUN,
                                  "grid": {"seed": [0, 1], "optim.lr": [0.001, 0.003]}})
    assert sweep.cmd_sweep(_args(spec, "--dir", str(tmp_path / "local"), "--workers", "2")) == 0
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert sweep.cmd_sweep(_args(spec, "--dir", str(tmp_path / "ray"), "--executor", "ray",
                                     "--cpus-per-point", "1")) == 0
    finally:
        ray.shutdown()
    names = [p["name"] for p in json.loads((tmp_path / "ray" / "manifest.json").read_text())[
        "points"]]
    assert len(names) == 4
    for name in names:
        local, remote = _summary(tmp_path / "local", name), _summary(tmp_path / "ray", name)
        assert (remote["final_loss"], remote["final_eval_loss"]) == (
            local["final_loss"], local["final_eval_loss"])


def _processes_in(path: pathlib.Path) -> list[int]:
    """Pids of the live processes whose command line names `path` (Linux /proc)."""
    pids = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_kill_9_of_the_sweep_process(tmp_path, point_env):
    """`kill -9` of a running `jaxscale sweep` takes its training point down with it; the rerun
    skips the finished point and resumes the interrupted one from its checkpoint to the same
    final state as an uninterrupted sweep, bitwise."""
    long_run = [o for o in TINY_RUN if not o.startswith("steps=")] + ["steps=150"]
    spec = _write_spec(tmp_path, {"base": "tiny", "overrides": long_run,
                                  "points": [["seed=0", "steps=4"], ["seed=1"]]})
    cli = [sys.executable, "-m", "jaxscale.cli", "sweep", spec, "--workers", "1", "--dir"]
    d = tmp_path / "killed"
    proc = subprocess.Popen([*cli, str(d)], cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    def saved() -> bool:  # a committed checkpoint (orbax writes under a temporary name)
        return any(p.name.isdigit() for p in (d / "seed=1" / "checkpoints").glob("*"))

    while not ((d / "seed=0-steps=4" / "summary.json").is_file() and saved()):
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before the kill"
        time.sleep(0.05)
    assert len(_processes_in(d / "seed=1")) == 1  # the point's `jaxscale train`
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the death signal is asynchronous
        if not _processes_in(d / "seed=1"):
            break
        time.sleep(0.05)
    assert _processes_in(d / "seed=1") == []
    assert not (d / "seed=1" / "summary.json").exists()
    log0 = (d / "seed=0-steps=4" / "train.log").read_text()

    rerun = subprocess.run([*cli, str(d)], cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "sweep: 1 of 2 points already done" in rerun.stderr
    assert (d / "seed=0-steps=4" / "train.log").read_text() == log0
    resumed = re.search(r"checkpoint: resumed from step (\d+)",
                        (d / "seed=1" / "train.log").read_text())
    assert resumed and 0 < int(resumed.group(1)) < 150
    reference = subprocess.run([*cli, str(tmp_path / "ref")], cwd=tmp_path, capture_output=True)
    assert reference.returncode == 0
    for name in ("seed=0-steps=4", "seed=1"):
        killed, ref = _summary(d, name), _summary(tmp_path / "ref", name)
        assert (killed["final_loss"], killed["final_eval_loss"]) == (
            ref["final_loss"], ref["final_eval_loss"])
