"""Compound scaling of image models: a metric against training FLOPs, one line per direction.

A compound-scaling sweep (`configs/sweeps/resnet-compound.yaml`) grows a model by
`model.scale`: depth by alpha^phi, width by beta^phi and input resolution by gamma^phi
(Tan & Le 2019). A direction is one (alpha, beta, gamma) and its points are its runs with
phi > 0 plus every phi = 0 run, the start that all directions share. Named directions have one
multiplier above 1 (`depth`, `width`, `resolution`); any other mix is a `compound` direction.

Per direction the fit is least squares of the metric (final eval accuracy or loss) against
log2 C (`scipy.stats.linregress`): its slope is the change per doubling of training FLOPs, with
a 95% Student-t interval on n - 2 degrees of freedom (wide for three runs, as it should be).
Directions are compared at one budget, the largest C that every direction reached (`common_C`),
each read off its own line there: the direction that does best at equal compute is `best`.

Array suffix: P points of a direction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import yaml

from jaxscale.errors import ConfigError
from jaxscale.validation import choices_error

METRICS = ("accuracy", "loss")  # summary.json's final_eval_accuracy or final_eval_loss
MULTIPLIERS = ("alpha", "beta", "gamma")  # model.scale's depth, width and resolution bases
DIRECTIONS = ("depth", "width", "resolution")  # the name of a direction with one multiplier > 1
MIN_POINTS = 3  # a line has two parameters; a third point leaves a residual and an interval


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished run of a compound-scaling sweep."""

    name: str  # its workdir's name
    phi: float  # model.scale.phi
    multipliers: tuple[float, float, float]  # model.scale.(alpha, beta, gamma)
    C: float  # training FLOPs (summary.json's train_flops)
    loss: float  # final eval loss
    accuracy: float | None  # final eval accuracy (None when the task reports none)

    def metric(self, metric: str) -> float:
        value = self.loss if metric == "loss" else self.accuracy
        if value is None:
            raise ConfigError(f"run {self.name!r} has no final_eval_accuracy in its "
                              f"summary.json; fit --metric loss")
        return value


def direction_name(multipliers: Sequence[float]) -> str:
    """`depth`, `width` or `resolution` when one multiplier is above 1, else `compound (...)`."""
    above = [i for i, m in enumerate(multipliers) if m > 1]
    if len(above) == 1:
        return DIRECTIONS[above[0]]
    return "compound (" + ", ".join(f"{k}={m:g}" for k, m in zip(
        MULTIPLIERS, multipliers, strict=True)) + ")"


def is_compound_sweep(sweep_dir: str | os.PathLike) -> bool:
    """Whether any run of the sweep was trained with model.scale.phi > 0."""
    for config_path in pathlib.Path(sweep_dir).glob("*/config.yaml"):
        scale = (yaml.safe_load(config_path.read_text()).get("model") or {}).get("scale") or {}
        if float(scale.get("phi", 0)) > 0:
            return True
    return False


def read_compound(sweep_dir: str | os.PathLike) -> tuple[list[Run], list[str]]:
    """Runs from `<sweep_dir>/*/summary.json` and each run's config.yaml (its `model.scale`).

    Returns:
      (runs, skipped): the finished runs, and the names of those with no final eval loss.

    Raises:
      ConfigError: no run has a summary.json, a run's model has no `model.scale`, no run has
        phi > 0, or the runs mix models or datasets (their metrics do not compare).
    """
    summaries = sorted(pathlib.Path(sweep_dir).glob("*/summary.json"))
    if not summaries:
        raise ConfigError(f"{sweep_dir}: no */summary.json; is it a folder of run workdirs?")
    runs, skipped, seen = [], [], {}
    for summary_path in summaries:
        run = summary_path.parent
        summary = json.loads(summary_path.read_text())
        config_path = run / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        model, data = config.get("model") or {}, config.get("data") or {}
        for key, value in (("model.name", model.get("name")), ("data.source", data.get("source"))):
            first_run, first_value = seen.setdefault(key, (run.name, value))
            if value != first_value:
                raise ConfigError(f"runs of different models or data do not compare: "
                                  f"{key}={first_value!r} (run {first_run!r}) vs {value!r} "
                                  f"(run {run.name!r})")
        if "scale" not in model:
            raise ConfigError(f"run {run.name!r}: its config.yaml has no model.scale; compound "
                              f"scaling needs a model that has one (resnet, vit, the CNN zoo)")
        if summary["final_eval_loss"] is None:
            skipped.append(run.name)
            continue
        scale = model["scale"]
        runs.append(Run(name=run.name, phi=float(scale["phi"]),
                        multipliers=tuple(float(scale[k]) for k in MULTIPLIERS),
                        C=float(summary["train_flops"]), loss=float(summary["final_eval_loss"]),
                        accuracy=summary.get("final_eval_accuracy")))
    if runs and not any(r.phi > 0 for r in runs):
        raise ConfigError(f"{sweep_dir}: no run has model.scale.phi > 0; not a compound-scaling "
                          f"sweep")
    return runs, skipped


@dataclasses.dataclass(frozen=True, eq=False)
class DirectionFit:
    """metric = intercept + slope * log2(C) over one direction's runs."""

    name: str  # depth | width | resolution | compound (...)
    multipliers: tuple[float, float, float]  # (alpha, beta, gamma)
    runs: tuple[Run, ...]  # the phi = 0 runs, then this direction's, by phi
    slope: float  # metric per doubling of training FLOPs
    slope_ci: tuple[float, float]  # 95% Student-t interval of the slope
    intercept: float  # metric at C = 1 FLOP (log2 C = 0)
    r2: float  # coefficient of determination of the line

    def at(self, C: float) -> float:
        """The line's metric at C training FLOPs."""
        return self.intercept + self.slope * math.log2(C)


@dataclasses.dataclass(frozen=True, eq=False)
class CompoundFit:
    """One line per direction, compared at the largest budget every direction reached."""

    metric: str  # accuracy | loss
    directions: tuple[DirectionFit, ...]  # in the order of their first run
    common_C: float  # the smallest of the directions' largest C
    best: str  # the direction with the best metric at common_C

    def to_json(self) -> dict:
        """The fit as JSON-ready numbers, each direction with its runs' C and metric."""
        return {"metric": self.metric, "common_C": self.common_C, "best": self.best,
                "directions": [{
                    "name": d.name, **dict(zip(MULTIPLIERS, d.multipliers, strict=True)),
                    "slope_per_doubling": d.slope, "slope_ci": list(d.slope_ci),
                    "intercept": d.intercept, "r2": d.r2, "at_common_C": d.at(self.common_C),
                    "runs": [{"name": r.name, "phi": r.phi, "C": r.C,
                              self.metric: r.metric(self.metric)} for r in d.runs]}
                    for d in self.directions]}


def _fit_direction(name: str, multipliers: tuple[float, float, float], runs: list[Run],
                   metric: str) -> DirectionFit:
    from scipy import stats

    if len(runs) < MIN_POINTS:
        raise ConfigError(f"direction {name}: {len(runs)} runs ({', '.join(r.name for r in runs)})"
                          f"; a line in log C needs {MIN_POINTS} or more (the phi = 0 runs count "
                          f"for every direction)")
    log2C_P = np.log2([r.C for r in runs])
    if np.ptp(log2C_P) == 0:
        raise ConfigError(f"direction {name}: every run has C = {runs[0].C:.3g} FLOPs; "
                          f"nothing to fit against")
    line = stats.linregress(log2C_P, [r.metric(metric) for r in runs])
    half = float(stats.t.ppf(0.975, len(runs) - 2) * line.stderr)
    return DirectionFit(name=name, multipliers=multipliers, runs=tuple(runs),
                        slope=float(line.slope), slope_ci=(line.slope - half, line.slope + half),
                        intercept=float(line.intercept), r2=float(line.rvalue**2))


def fit_compound(runs: Sequence[Run], metric: str = "accuracy") -> CompoundFit:
    """Fit each direction's line and compare the directions at their common budget.

    Raises:
      ConfigError: `metric` is not valid, a direction has fewer than MIN_POINTS runs (the
        phi = 0 runs included) or all at one C, or a run lacks the metric.
    """
    if metric not in METRICS:
        raise choices_error("metric", metric, METRICS)
    start = [r for r in runs if r.phi == 0]
    grown: dict[tuple[float, float, float], list[Run]] = {}
    for r in runs:
        if r.phi > 0:
            grown.setdefault(r.multipliers, []).append(r)
    if not grown:
        raise ConfigError("no run has model.scale.phi > 0; nothing grows in any direction")
    directions = tuple(
        _fit_direction(direction_name(m), m, start + sorted(rs, key=lambda r: r.phi), metric)
        for m, rs in grown.items())
    common_C = min(max(r.C for r in d.runs) for d in directions)
    pick = max if metric == "accuracy" else min
    best = pick(directions, key=lambda d: d.at(common_C)).name
    return CompoundFit(metric=metric, directions=directions, common_C=common_C, best=best)


def _value(metric: str, x: float) -> str:
    return f"{100 * x:.2f}%" if metric == "accuracy" else f"{x:.4f}"


def _delta(metric: str, x: float) -> str:
    return f"{100 * x:+.2f}" if metric == "accuracy" else f"{x:+.4f}"


def format_report(fit: CompoundFit) -> str:
    """A row per direction: runs, FLOPs range, metric range, slope per doubling of C with its
    95% interval, R^2 and the metric at common_C; then the best direction."""
    unit = " (points)" if fit.metric == "accuracy" else ""
    lines = [f"compound scaling: final eval {fit.metric} against training FLOPs C, a line in "
             f"log C per direction (the phi = 0 runs shared)",
             f"  {'direction':<12} {'runs':>4}  {'C':<17}  {'per doubling of C' + unit:<32}"
             f"{'R^2':>5}  at C = {fit.common_C:.3g}"]
    for d in fit.directions:
        Cs = [r.C for r in d.runs]
        slope = (f"{_delta(fit.metric, d.slope)} [{_delta(fit.metric, d.slope_ci[0])}, "
                 f"{_delta(fit.metric, d.slope_ci[1])}]")
        lines.append(f"  {d.name:<12} {len(d.runs):>4}  {min(Cs):.3g}-{max(Cs):<9.3g}  "
                     f"{slope:<32}{d.r2:>5.2f}  {_value(fit.metric, d.at(fit.common_C))}")
    best = next(d for d in fit.directions if d.name == fit.best)
    lines.append(f"best at C = {fit.common_C:.3g}: {fit.best} "
                 f"({_value(fit.metric, best.at(fit.common_C))})")
    return "\n".join(lines)
