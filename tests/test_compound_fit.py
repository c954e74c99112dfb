"""Compound-scaling fits (jaxscale.scaling.compound): one line of the metric against log2 C per
model.scale direction, read from a sweep's runs, compared at a common budget; report, JSON,
plot, the `fit` CLI and its errors."""

import argparse
import json
import math

import numpy as np
import pytest
import yaml

from jaxscale.errors import ConfigError
from jaxscale.scaling import compound, fit, report
from jaxscale.scaling.plots import plot_compound

C0 = 1e12
# accuracy = 0.90 + slope * log2(C / C0); each phi about doubles (depth, width) or more than
# doubles (resolution) the FLOPs.
SLOPES = {"depth": 0.02, "width": 0.03, "resolution": 0.01}
GROWTH = {"depth": ((2.0, 1.0, 1.0), 2.0), "width": ((1.0, 1.414, 1.0), 2.0),
          "resolution": ((1.0, 1.0, 1.414), 2.25)}


def write_run(sweep_dir, name, *, phi, multipliers, C, accuracy, loss=0.3, model="resnet",
              source="digits"):
    run = sweep_dir / name
    run.mkdir(parents=True)
    scale = {"phi": phi, **dict(zip(compound.MULTIPLIERS, multipliers, strict=True)),
             "width_divisor": 8}
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": model, "scale": scale}, "data": {"source": source}}))
    (run / "summary.json").write_text(json.dumps(
        {"final_eval_loss": loss, "final_eval_accuracy": accuracy, "train_flops": C,
         "examples_seen": 1000}))


def write_sweep(sweep_dir, noise=0.0, phis=(1, 2)):
    """The phi = 0 start and each direction at `phis`; metric exactly on its line + noise."""
    rng = np.random.default_rng(0)
    write_run(sweep_dir, "phi=0", phi=0, multipliers=(1.0, 1.0, 1.0), C=C0, accuracy=0.90,
              loss=0.40 - 0.90 / 10)
    for direction, (multipliers, growth) in GROWTH.items():
        for phi in phis:
            C = C0 * growth**phi
            accuracy = 0.90 + SLOPES[direction] * math.log2(C / C0) + noise * rng.normal()
            write_run(sweep_dir, f"{direction}-phi={phi}", phi=phi, multipliers=multipliers,
                      C=C, accuracy=accuracy, loss=0.40 - accuracy / 10)


def test_exact_lines_are_recovered(tmp_path):
    write_sweep(tmp_path)
    runs, skipped = compound.read_compound(tmp_path)
    assert skipped == [] and len(runs) == 7
    result = compound.fit_compound(runs)
    assert [d.name for d in result.directions] == ["depth", "resolution", "width"]
    for d in result.directions:
        assert d.slope == pytest.approx(SLOPES[d.name], rel=1e-9)
        assert d.r2 == pytest.approx(1.0)
        assert [r.phi for r in d.runs] == [0, 1, 2]
        assert d.at(C0) == pytest.approx(0.90)
    # Depth and width reach 4 C0, resolution 5.06 C0: compared at 4 C0, width is best.
    assert result.common_C == 4 * C0
    assert result.best == "width"
    loss_fit = compound.fit_compound(runs, "loss")
    assert loss_fit.best == "width"  # loss = 0.40 - accuracy / 10: the lowest loss is width's
    assert {d.name: d.slope for d in loss_fit.directions} == pytest.approx(
        {k: -v / 10 for k, v in SLOPES.items()})


def test_noisy_intervals_cover_the_slopes(tmp_path):
    write_sweep(tmp_path, noise=0.002, phis=(1, 2, 3, 4))
    result = compound.fit_compound(compound.read_compound(tmp_path)[0])
    for d in result.directions:
        low, high = d.slope_ci
        assert low < SLOPES[d.name] < high, (d.name, low, high)
        assert d.slope == pytest.approx(SLOPES[d.name], abs=0.004)
        assert len(d.runs) == 5


def test_direction_names():
    assert compound.direction_name((2.0, 1.0, 1.0)) == "depth"
    assert compound.direction_name((1.0, 1.414, 1.0)) == "width"
    assert compound.direction_name((1.0, 1.0, 1.15)) == "resolution"
    assert compound.direction_name((1.2, 1.1, 1.15)) == "compound (alpha=1.2, beta=1.1, gamma=1.15)"


def test_report_json_and_plot(tmp_path):
    write_sweep(tmp_path)
    result = compound.fit_compound(compound.read_compound(tmp_path)[0])
    text = compound.format_report(result)
    assert "best at C = 4e+12: width (96.00%)" in text
    depth_row = next(line for line in text.splitlines() if line.strip().startswith("depth"))
    assert depth_row.split()[:3] == ["depth", "3", "1e+12-4e+12"]
    assert "+2.00 [" in depth_row and depth_row.endswith("94.00%")
    out = result.to_json()
    assert json.loads(json.dumps(out)) == out
    assert out["best"] == "width" and out["common_C"] == 4e12
    depth = out["directions"][0]
    assert depth["name"] == "depth" and (depth["alpha"], depth["beta"], depth["gamma"]) == (
        2.0, 1.0, 1.0)
    assert depth["slope_per_doubling"] == pytest.approx(0.02)
    assert depth["at_common_C"] == pytest.approx(0.94)
    assert [r["phi"] for r in depth["runs"]] == [0, 1, 2]
    path = plot_compound(result, tmp_path / "plots")
    assert path.name == "compound.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fit_args(*argv):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers())
    return parser.parse_args(["fit", *argv])


def test_cli_detects_a_compound_sweep(tmp_path, capsys):
    write_sweep(tmp_path / "sweep")
    args = _fit_args(str(tmp_path / "sweep"), "--json", str(tmp_path / "fit.json"))
    assert args.func(args) == 0
    assert json.loads((tmp_path / "fit.json").read_text())["best"] == "width"
    assert (tmp_path / "sweep" / "compound.png").is_file()
    assert "best at C = 4e+12: width" in capsys.readouterr().out
    args = _fit_args(str(tmp_path / "sweep"), "--budget", "1e15")
    with pytest.raises(ConfigError) as e:
        args.func(args)
    assert str(e.value) == ("--budget sizes a language model's N and D from L(N, D); a "
                            "compound-scaling sweep is compared at the C its directions share")


def test_errors(tmp_path):
    # Two runs in a direction (phi = 0 and one more) make a line with no residual.
    write_run(tmp_path, "phi=0", phi=0, multipliers=(1.0, 1.0, 1.0), C=C0, accuracy=0.9)
    write_run(tmp_path, "depth-phi=1", phi=1, multipliers=(2.0, 1.0, 1.0), C=2 * C0,
              accuracy=0.92)
    with pytest.raises(ConfigError) as e:
        compound.fit_compound(compound.read_compound(tmp_path)[0])
    assert str(e.value) == ("direction depth: 2 runs (phi=0, depth-phi=1); a line in log C needs "
                            "3 or more (the phi = 0 runs count for every direction)")
    with pytest.raises(ConfigError) as e:
        compound.fit_compound(compound.read_compound(tmp_path)[0], "accuray")
    assert str(e.value) == ("metric='accuray' is not valid; choose one of: accuracy, loss "
                            "(did you mean 'accuracy'?)")
    write_run(tmp_path, "depth-phi=2", phi=2, multipliers=(2.0, 1.0, 1.0), C=4 * C0,
              accuracy=None)
    with pytest.raises(ConfigError) as e:
        compound.fit_compound(compound.read_compound(tmp_path)[0])
    assert str(e.value) == ("run 'depth-phi=2' has no final_eval_accuracy in its summary.json; "
                            "fit --metric loss")
    assert compound.fit_compound(compound.read_compound(tmp_path)[0], "loss").best == "depth"
    write_run(tmp_path, "vit", phi=1, multipliers=(1.0, 1.0, 2.0), C=C0, accuracy=0.9,
              model="vit")
    with pytest.raises(ConfigError) as e:
        compound.read_compound(tmp_path)
    assert str(e.value) == ("runs of different models or data do not compare: model.name="
                            "'resnet' (run 'depth-phi=1') vs 'vit' (run 'vit')")


def test_not_a_compound_sweep(tmp_path):
    write_run(tmp_path, "phi=0", phi=0, multipliers=(1.0, 1.0, 1.0), C=C0, accuracy=0.9)
    assert not compound.is_compound_sweep(tmp_path)
    with pytest.raises(ConfigError) as e:
        compound.read_compound(tmp_path)
    assert str(e.value) == (f"{tmp_path}: no run has model.scale.phi > 0; not a "
                            f"compound-scaling sweep")
    # The language-model law refuses image runs (examples, not tokens) with the way out.
    with pytest.raises(ConfigError) as e:
        fit.read_sweep(tmp_path)
    assert str(e.value) == ("run 'phi=0' counts examples, not tokens: L(N, D) is a language "
                            "model's law; for image models sweep model.scale and fit --compound")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "decoder"}}))
    (tmp_path / "lm" / "summary.json").write_text(json.dumps({"final_eval_loss": 3.0}))
    with pytest.raises(ConfigError) as e:
        compound.read_compound(tmp_path)
    assert str(e.value) == ("run 'lm': its config.yaml has no model.scale; compound scaling "
                            "needs a model that has one (resnet, vit, the CNN zoo)")


def test_a_direction_at_one_budget():
    runs = [compound.Run(name=f"r{i}", phi=i, multipliers=(1.0, 1.0, 1.5), C=C0, loss=0.3,
                         accuracy=0.9) for i in range(3)]
    with pytest.raises(ConfigError) as e:
        compound.fit_compound(runs)
    assert str(e.value) == ("direction resolution: every run has C = 1e+12 FLOPs; nothing to "
                            "fit against")
    with pytest.raises(ConfigError) as e:
        compound.fit_compound(runs[:1])
    assert str(e.value) == "no run has model.scale.phi > 0; nothing grows in any direction"
