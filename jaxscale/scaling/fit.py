"""Scaling-law fits of final losses against parameters N and training tokens D.

Two estimates of the compute-optimal model size, as in Hoffmann et al. 2022 ("Chinchilla"):

- approach 3 (`fit_law`): the parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted in
  log space with a Huber loss, intervals by bootstrap over the points;
- approach 2 (`fit_isoflop`): per compute budget C, a parabola of loss against log N; the
  minima N_opt(C) give the exponent a of N_opt ∝ C^a.

Under C = 6 N D the law's optimum is closed form (`LawFit.optimum`). `suggest_shape` turns an
N into decoder overrides for `jaxscale train`.

Array suffixes: P points, S optimiser starts, K bootstrap resamples.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from jaxscale.errors import ConfigError
from jaxscale.validation import choices_error

PARAMS = ("non_embedding", "total")  # which parameter count of a run's summary.json is N
HUBER_DELTA = 1e-3  # Hoffmann et al.: robust to the few runs that diverge or stop early
# Starting grid of (a=log A, alpha, b=log B, beta, e=log E), Hoffmann et al.'s. The objective is
# evaluated on all of it at once and L-BFGS-B runs from the best TOP_STARTS only: the fit is
# non-convex, but its basins are wide, and 4500 full minimisations per resample are not needed.
GRID = (range(0, 30, 5), (0.0, 0.5, 1.0, 1.5, 2.0), range(0, 30, 5), (0.0, 0.5, 1.0, 1.5, 2.0),
        (-1.0, -0.5, 0.0, 0.5, 1.0))
TOP_STARTS = 8
SAME_BUDGET = 0.01  # points whose C agree to 1% share a budget (a sweep's planned C rounds)


@dataclasses.dataclass(frozen=True)
class Point:
    """One finished run of a sweep."""

    N: float  # parameters (non-embedding unless read_sweep was told otherwise)
    D: float  # training tokens
    C: float  # training FLOPs
    loss: float  # final eval loss (nats per token)
    name: str = ""  # the run (its workdir's name, or the CSV's `name` column)


# --------------------------------------------------------------------------------------------
# Reading points.


def read_csv(path: str | os.PathLike) -> list[Point]:
    """Points from a CSV with a header row and the columns N, D, C, loss (others are ignored;
    a `name` column names the points).

    Raises:
      ConfigError: a column is missing, or a value is not a number.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
    for column in ("N", "D", "C", "loss"):
        if column not in columns:
            raise ConfigError(f"{path}: no column {column!r}; columns found: {', '.join(columns)}"
                              "; need N, D, C, loss")
    points = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {k: float(row[k]) for k in ("N", "D", "C", "loss")}
        except (TypeError, ValueError):
            raise ConfigError(f"{path} line {line}: N, D, C, loss must be numbers; got "
                              f"{[row[k] for k in ('N', 'D', 'C', 'loss')]}") from None
        points.append(Point(**values, name=row.get("name") or f"line {line}"))
    return points


def read_sweep(sweep_dir: str | os.PathLike,
               params: str = "non_embedding") -> tuple[list[Point], list[str]]:
    """Points from the runs of a sweep: every `<sweep_dir>/*/summary.json` and its config.yaml.

    Args:
      sweep_dir: the folder whose subfolders are the runs' workdirs.
      params: "non_embedding" or "total": the parameter count taken as N.

    C is a run's `train_flops`, or, for the points of an isoflop sweep, the budget its
    manifest.json planned: the runs of one budget differ in train_flops by the attention FLOPs
    and the rounding of their steps (a few percent), not in the budget they were sized for.

    Returns:
      (points, skipped): the finished runs, and the names of those with no final eval loss.

    Raises:
      ConfigError: `params` is not valid, no run has a summary.json, or the runs mix tokenizers
        (or vocabulary sizes): their losses are in different units.
    """
    if params not in PARAMS:
        raise choices_error("params", params, PARAMS)
    summaries = sorted(pathlib.Path(sweep_dir).glob("*/summary.json"))
    if not summaries:
        raise ConfigError(f"{sweep_dir}: no */summary.json; is it a folder of run workdirs?")
    manifest = pathlib.Path(sweep_dir) / "manifest.json"
    budgets = ({p["name"]: p.get("budget") for p in json.loads(manifest.read_text())["points"]}
               if manifest.is_file() else {})
    points, skipped, seen = [], [], {}
    for summary_path in summaries:
        run = summary_path.parent
        summary = json.loads(summary_path.read_text())
        config_path = run / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        for key, value in (("data.tokenizer", config.get("data", {}).get("tokenizer")),
                           ("model.vocab_size", config.get("model", {}).get("vocab_size"))):
            first_run, first_value = seen.setdefault(key, (run.name, value))
            if value != first_value:
                raise ConfigError(
                    f"losses of different tokenizers do not compare: {key}={first_value!r} "
                    f"(run {first_run!r}) vs {value!r} (run {run.name!r})")
        if summary["final_eval_loss"] is None:
            skipped.append(run.name)
            continue
        if "tokens_seen" not in summary:
            raise ConfigError(f"run {run.name!r} counts examples, not tokens: L(N, D) is a "
                              f"language model's law; for image models sweep model.scale and "
                              f"fit --compound")
        points.append(Point(N=float(summary[f"params_{params}"]),
                            D=float(summary["tokens_seen"]),
                            C=float(budgets.get(run.name) or summary["train_flops"]),
                            loss=float(summary["final_eval_loss"]), name=run.name))
    return points, skipped


def _columns(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log N, log D, log loss) of the points, each [P]."""
    logN_P = np.log([p.N for p in points])
    logD_P = np.log([p.D for p in points])
    logL_P = np.log([p.loss for p in points])
    return logN_P, logD_P, logL_P


# --------------------------------------------------------------------------------------------
# Approach 3: the parametric law.


def _optimum(C: Any, A: Any, alpha: Any, B: Any, beta: Any) -> tuple[Any, Any]:
    """(N_opt, D_opt) minimising A / N^alpha + B / D^beta on C = 6 N D (broadcasts)."""
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N_opt = G * (C / 6) ** (beta / (alpha + beta))
    return N_opt, C / (6 * N_opt)


def _interval(samples_K: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples_K, [2.5, 97.5])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True, eq=False)
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with 95% bootstrap intervals."""

    E: float  # irreducible loss
    A: float  # parameter term's scale
    alpha: float  # parameter term's exponent
    B: float  # data term's scale
    beta: float  # data term's exponent
    E_ci: tuple[float, float]  # 95% percentile interval over the bootstrap fits
    A_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    B_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    residuals_P: np.ndarray  # log L_pred - log L_obs per point, in the order given
    bootstrap_K5: np.ndarray  # (E, A, alpha, B, beta) of each bootstrap fit

    def loss(self, N: Any, D: Any) -> Any:
        """The law's loss at N parameters and D tokens (broadcasts over arrays)."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimum(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt): the lowest loss for C training FLOPs under C = 6 N D."""
        N_opt, D_opt = _optimum(C, self.A, self.alpha, self.B, self.beta)
        return float(N_opt), float(D_opt)

    def optimum_ci(self, C: float) -> tuple[tuple[float, float], tuple[float, float]]:
        """95% intervals of (N_opt, D_opt) at C, one optimum per bootstrap fit."""
        _, A_K, alpha_K, B_K, beta_K = self.bootstrap_K5.T
        N_opt_K, D_opt_K = _optimum(C, A_K, alpha_K, B_K, beta_K)
        return _interval(N_opt_K), _interval(D_opt_K)


def _terms(x_5: np.ndarray, logN_P: np.ndarray, logD_P: np.ndarray) -> np.ndarray:
    """The law's three terms in log space, [3, P]: log L_pred is their logsumexp.

    `x_5` may hold [S, 1] columns instead of numbers: then the terms of S parameter sets, [3, S, P].
    """
    a, alpha, b, beta, e = x_5
    n_term = a - alpha * logN_P
    return np.stack([n_term, b - beta * logD_P, np.broadcast_to(e, n_term.shape)])


def _objective(x_5: np.ndarray, logN_P: np.ndarray, logD_P: np.ndarray,
               logL_P: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss of log L_pred - log L_obs at x = (a, alpha, b, beta, e), and its gradient.

    Divided by the Huber delta, so the gradient per point is O(1) and L-BFGS-B's default
    tolerances apply."""
    from scipy import special  # scipy loads where used: every CLI command builds `add_parser`

    terms_3P = _terms(x_5, logN_P, logD_P)
    pred_P = np.logaddexp.reduce(terms_3P, axis=0)
    r_P = pred_P - logL_P
    weight_3P = np.exp(terms_3P - pred_P)  # d pred / d term
    slope_P = np.clip(r_P, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
    grad_5 = np.array([
        slope_P @ weight_3P[0], -(slope_P * weight_3P[0]) @ logN_P,
        slope_P @ weight_3P[1], -(slope_P * weight_3P[1]) @ logD_P,
        slope_P @ weight_3P[2],
    ])
    return float(special.huber(HUBER_DELTA, r_P).sum() / HUBER_DELTA), grad_5


def _minimise(starts_S5: np.ndarray, columns: tuple[np.ndarray, ...]) -> np.ndarray:
    """The best L-BFGS-B minimum of `_objective` over the starts; exponents kept >= 0."""
    from scipy import optimize

    bounds = [(None, None), (0, None), (None, None), (0, None), (None, None)]
    results = [optimize.minimize(_objective, x0, args=columns, jac=True, method="L-BFGS-B",
                                 bounds=bounds) for x0 in starts_S5]
    return min(results, key=lambda r: r.fun).x


def _best_grid_starts(columns: tuple[np.ndarray, ...]) -> np.ndarray:
    """The TOP_STARTS points of GRID with the lowest objective, [S, 5]."""
    from scipy import special

    grid_S5 = np.array(list(itertools.product(*GRID)), dtype=float)
    logN_P, logD_P, logL_P = columns
    terms_3SP = _terms(grid_S5.T[:, :, None], logN_P, logD_P)
    r_SP = np.logaddexp.reduce(terms_3SP, axis=0) - logL_P
    objective_S = special.huber(HUBER_DELTA, r_SP).sum(axis=1)
    return grid_S5[np.argsort(objective_S)[:TOP_STARTS]]


def fit_law(points: Sequence[Point], *, bootstrap: int = 200, seed: int = 0) -> LawFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to the points (Chinchilla approach 3).

    Minimises the Huber loss (delta 1e-3) of log L_pred - log L_obs with L-BFGS-B, where
    L_pred = exp(logsumexp(a - alpha log N, b - beta log D, e)), A = e^a, B = e^b, E = e^e,
    from the best starts of a grid. Each bootstrap resample (points drawn with replacement)
    is refitted from the full fit's minimum.

    Args:
      points: at least 5, one per run.
      bootstrap: resamples for the 95% percentile intervals.
      seed: the resampling's seed.

    Raises:
      ConfigError: fewer than 5 points, or `bootstrap` < 1.
    """
    if len(points) < 5:
        raise ConfigError(f"fit needs at least 5 points for E, A, alpha, B, beta; got "
                          f"{len(points)}")
    if bootstrap < 1:
        raise ConfigError(f"bootstrap={bootstrap} is not valid; it must be at least 1")
    from threadpoolctl import threadpool_limits

    columns = _columns(points)
    rng = np.random.default_rng(seed)
    resampled_K5 = []
    # L-BFGS-B's BLAS calls are 5-long vectors: waking BLAS threads for them costs 5x the work.
    with threadpool_limits(limits=1, user_api="blas"):
        best_5 = _minimise(_best_grid_starts(columns), columns)
        for _ in range(bootstrap):
            index_P = rng.integers(0, len(points), len(points))
            resampled_K5.append(_minimise(best_5[None], tuple(c[index_P] for c in columns)))
    a, alpha, b, beta, e = best_5
    a_K, alpha_K, b_K, beta_K, e_K = np.array(resampled_K5).T
    bootstrap_K5 = np.stack([np.exp(e_K), np.exp(a_K), alpha_K, np.exp(b_K), beta_K], axis=1)
    law = dict(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))
    intervals = {f"{name}_ci": _interval(bootstrap_K5[:, i]) for i, name in enumerate(law)}
    logN_P, logD_P, logL_P = columns
    residuals_P = np.logaddexp.reduce(_terms(best_5, logN_P, logD_P), axis=0) - logL_P
    return LawFit(**law, **intervals, residuals_P=residuals_P, bootstrap_K5=bootstrap_K5)


# --------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas.


@dataclasses.dataclass(frozen=True, eq=False)
class IsoBudget:
    """One compute budget's points and the parabola through them."""

    C: float  # the budget: the mean C of its points
    logN_P: np.ndarray  # log N of its points
    loss_P: np.ndarray  # their losses
    parabola_3: np.ndarray  # loss ≈ polyval(parabola_3, log N), highest power first
    N_opt: float  # the parabola's minimum


@dataclasses.dataclass(frozen=True, eq=False)
class IsoFlopFit:
    """N_opt(C) = k C^a from the budgets' parabola minima; D_opt ∝ C^b with b = 1 - a."""

    a: float  # exponent of N_opt in C
    log_k: float  # log N_opt at C = 1
    budgets: list[IsoBudget]  # the budgets fitted, by increasing C
    notes: list[str]  # the budgets left out, and why

    @property
    def b(self) -> float:
        """Exponent of D_opt = C / (6 N_opt) in C."""
        return 1.0 - self.a

    def optimum(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) at C on the fitted power law."""
        N_opt = math.exp(self.log_k + self.a * math.log(C))
        return N_opt, C / (6 * N_opt)


def _group_budgets(points: Sequence[Point]) -> list[list[Point]]:
    """Points grouped by C, increasing: a group takes the points within 1% of its smallest C."""
    groups: list[list[Point]] = []
    for point in sorted(points, key=lambda p: p.C):
        if groups and point.C <= groups[-1][0].C * (1 + SAME_BUDGET):
            groups[-1].append(point)
        else:
            groups.append([point])
    return groups


def fit_isoflop(points: Sequence[Point]) -> IsoFlopFit:
    """Fit N_opt ∝ C^a from IsoFLOP profiles (Chinchilla approach 2).

    Per budget (points whose C agree to 1%) with at least 3 model sizes, a parabola of loss
    against log N gives N_opt(C) at its vertex; a budget whose parabola opens downwards has no
    minimum and is left out (named in `notes`). A line through (log C, log N_opt) gives a.

    Raises:
      ConfigError: fewer than 2 budgets have a minimum.
    """
    budgets, notes = [], []
    for group in _group_budgets(points):
        C = float(np.mean([p.C for p in group]))
        sizes = len({p.N for p in group})
        if sizes < 3:
            notes.append(f"C={C:.3g}: {sizes} model size(s), a parabola needs 3")
            continue
        logN_P = np.log([p.N for p in group])
        loss_P = np.array([p.loss for p in group])
        parabola_3 = np.polyfit(logN_P, loss_P, 2)
        if parabola_3[0] <= 0:
            notes.append(f"C={C:.3g}: the parabola opens downwards (no minimum)")
            continue
        N_opt = math.exp(-parabola_3[1] / (2 * parabola_3[0]))
        budgets.append(IsoBudget(C, logN_P, loss_P, parabola_3, N_opt))
    if len(budgets) < 2:
        raise ConfigError(f"isoflop fit needs at least 2 budgets with a minimum; got "
                          f"{len(budgets)}" + (f" ({'; '.join(notes)})" if notes else ""))
    a, log_k = np.polyfit(np.log([b.C for b in budgets]), np.log([b.N_opt for b in budgets]), 1)
    return IsoFlopFit(float(a), float(log_k), budgets, notes)


# --------------------------------------------------------------------------------------------
# A decoder shape for N parameters.

ASPECT = 64  # d_model / num_layers: Kaplan et al. 2020 find loss flat over ~20..200
HEAD_DIM = 64


def suggest_shape(N: float, *, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """A decoder (SwiGLU MLP, untied output) with about N non-embedding parameters.

    Rule: d_ff = 4 d_model, heads of 64, and d_model = 64 num_layers. A layer then holds
    16 d^2 matmul parameters (4 d^2 attention, 12 d^2 SwiGLU) and the untied output projection
    d V, which `metrics.parameter_counts` counts as non-embedding; so d solves
    d^3 / 4 + V d = N, rounded to a multiple of 64, and num_layers is then the nearest count
    that gives N. Norm weights (< 0.1%) are not counted.

    Returns:
      {"overrides": ["model.d_model=..", ...], "N": the shape's non-embedding parameters,
       "flops_per_token": its causal training FLOPs per token at seq_len}.
    """
    from jaxscale.analysis.metrics import flops_per_token
    from jaxscale.config import ModelConfig

    roots = np.roots([16 / ASPECT, 0, vocab_size, -N])
    d_exact = max(r.real for r in roots if abs(r.imag) < 1e-9 * abs(r))
    d_model = max(HEAD_DIM, HEAD_DIM * round(d_exact / HEAD_DIM))
    num_layers = max(1, round((N - vocab_size * d_model) / (16 * d_model**2)))
    heads = d_model // HEAD_DIM
    shape = dict(d_model=d_model, num_layers=num_layers, num_heads=heads, num_kv_heads=heads,
                 d_ff=4 * d_model)
    flops = flops_per_token(ModelConfig(**shape, vocab_size=vocab_size, max_seq_len=seq_len),
                            seq_len)
    return {"overrides": [f"model.{k}={v}" for k, v in shape.items()],
            "N": flops.matmul_params, "flops_per_token": flops.causal_per_token}
