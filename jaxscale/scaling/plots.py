"""PNGs of the scaling fits: loss against compute with the law's compute-optimal frontier, the
IsoFLOP parabolas and the law's residuals; for a compound-scaling sweep, the metric against
compute per direction (matplotlib, imported when plotting)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxscale.analysis.plot import save_figure
from jaxscale.scaling.compound import CompoundFit
from jaxscale.scaling.fit import IsoFlopFit, LawFit, Point


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(points: Sequence[Point], law: LawFit, iso: IsoFlopFit | None,
             out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Write loss_vs_compute.png, isoflop.png (when there is an IsoFLOP fit) and residuals.png
    to `out_dir`; returns their paths.

    Raises:
      ImportError: matplotlib is not installed (pip install 'jaxscale[plot]').
    """
    plt = _pyplot()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    C_P = np.array([p.C for p in points])
    N_P = np.array([p.N for p in points])
    loss_P = np.array([p.loss for p in points])
    written = []

    fig, ax = plt.subplots(figsize=(7, 5))
    dots = ax.scatter(C_P, loss_P, c=np.log10(N_P), cmap="viridis", s=18)
    fig.colorbar(dots, ax=ax, label="log10 N")
    C_grid = np.geomspace(C_P.min() / 2, C_P.max() * 2, 100)
    N_opt, D_opt = np.vectorize(law.optimum)(C_grid)
    ax.plot(C_grid, law.loss(N_opt, D_opt), color="black", label="compute-optimal L(N_opt, D_opt)")
    ax.axhline(law.E, color="gray", linestyle=":", label=f"E = {law.E:.3g}")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="final eval loss",
           title=f"alpha = {law.alpha:.3f}, beta = {law.beta:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out_dir / "loss_vs_compute.png"))

    if iso is not None:
        fig, ax = plt.subplots(figsize=(7, 5))
        colors = plt.cm.plasma(np.linspace(0, 0.85, len(iso.budgets)))
        for budget, color in zip(iso.budgets, colors, strict=True):
            logN_grid = np.linspace(budget.logN_P.min(), budget.logN_P.max(), 50)
            ax.scatter(np.exp(budget.logN_P), budget.loss_P, color=color, s=18)
            ax.plot(np.exp(logN_grid), np.polyval(budget.parabola_3, logN_grid), color=color,
                    label=f"C = {budget.C:.2g}")
            ax.plot(budget.N_opt, np.polyval(budget.parabola_3, np.log(budget.N_opt)), "*",
                    color=color, markersize=12, markeredgecolor="black")
        ax.set(xscale="log", xlabel="parameters N", ylabel="final eval loss",
               title=f"IsoFLOP: N_opt ∝ C^{iso.a:.3f}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(save_figure(fig, out_dir / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(C_P, law.residuals_P, c=np.log10(N_P), cmap="viridis", s=18)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="log L_pred - log L_obs",
           title="residuals of the law")
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, out_dir / "residuals.png"))
    return written


def plot_compound(fit: CompoundFit, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write compound.png to `out_dir`: each direction's runs and line against C, and the
    common budget they are compared at; returns its path.

    Raises:
      ImportError: matplotlib is not installed (pip install 'jaxscale[plot]').
    """
    plt = _pyplot()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = 100 if fit.metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab10(np.arange(len(fit.directions)))
    for d, color in zip(fit.directions, colors, strict=True):
        C_P = np.array([r.C for r in d.runs])
        ax.scatter(C_P, [scale * r.metric(fit.metric) for r in d.runs], color=color, s=24)
        C_grid = np.geomspace(C_P.min(), C_P.max(), 20)
        ax.plot(C_grid, [scale * d.at(C) for C in C_grid], color=color,
                label=f"{d.name}: {scale * d.slope:+.3g} per doubling")
    ax.axvline(fit.common_C, color="gray", linestyle=":", label=f"C = {fit.common_C:.3g}")
    ax.set(xscale="log", xlabel="training FLOPs C",
           ylabel="final eval accuracy (%)" if fit.metric == "accuracy" else "final eval loss",
           title=f"compound scaling: best at equal C is {fit.best}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir / "compound.png")
