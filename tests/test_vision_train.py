"""Vision runs end to end: a ResNet with BatchNorm on augmented digits resumes bitwise (params,
optimizer state, batch statistics and the data order), and the digits presets reach their
advertised validation accuracy (slow)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxscale import config as config_lib
from jaxscale.analysis.metrics import read_jsonl
from jaxscale.models.resnet import forward_macs
from jaxscale.run.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = ["model.name=resnet", "model.blocks=[1,1]", "model.width=8", "model.stem=small",
          "model.num_classes=10", "task.name=classify", "task.num_classes=10",
          "task.input_shape=[12,12,1]", "data.source=digits", "data.val_fraction=0.2",
          "data.crop_padding=2", "data.mixup=0.2", "data.log_rows=true", "batch_size=16",
          "mesh.fsdp=8", "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=2",
          "optim.decay_steps=6",  # the same schedule whether the run stops at 4 or 8
          "eval_every=4", "eval_batches=2", "checkpoint.every=4", "log_every=1",
          "progress=false"]


def _rows(workdir: pathlib.Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(workdir / "data_rows" / "process-00000.jsonl")}


def test_a_vision_run_resumes_bitwise(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = jax.device_get(train(config_lib.load(
        "tiny", [*DIGITS, "steps=8", f"workdir={straight_dir}"])))
    train(config_lib.load("tiny", [*DIGITS, "steps=4", f"workdir={resumed_dir}"]))
    resumed = jax.device_get(train(config_lib.load(
        "tiny", [*DIGITS, "steps=8", f"workdir={resumed_dir}"])))
    assert int(resumed.step) == 8 and resumed.extra["batch_stats"]
    for part in ("params", "opt_state", "extra"):
        a, b = getattr(resumed, part), getattr(straight, part)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    # The same augmented rows at every step, before and after the restart.
    rows, straight_rows = _rows(resumed_dir), _rows(straight_dir)
    assert sorted(rows) == sorted(straight_rows) == list(range(8))
    for step in range(8):
        assert rows[step]["hashes"] == straight_rows[step]["hashes"], step
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    # The resumed run counts the examples and FLOPs of all 8 steps, before and after the stop.
    assert summary["examples_seen"] == 8 * 16
    assert summary["train_flops"] == 8 * 16 * 6 * forward_macs(
        config_lib.load("tiny", DIGITS).model, (12, 12, 1))
    assert summary["params_total"] == summary["params_non_embedding"] == sum(
        x.size for x in jax.tree_util.tree_leaves(resumed.params))


@pytest.mark.slow
@pytest.mark.parametrize("preset, accuracy", [("resnet-digits", 0.97), ("vit-digits", 0.95)])
def test_digits_presets_reach_their_accuracy(preset, accuracy, tmp_path):
    """The README's command; each preset states the validation accuracy it reaches."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # --cpu-devices sets the device count
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "train", "--config", preset, "--cpu-devices", "8",
         f"workdir={tmp_path}", "progress=false"],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_eval_accuracy"] >= accuracy, summary
    assert f"eval accuracy {100 * summary['final_eval_accuracy']:.2f}%" in proc.stdout + proc.stderr
    assert summary["examples_per_sec"] > 0 and summary["mfu"] > 0
