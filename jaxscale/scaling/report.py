"""`jaxscale fit`: the fits of `scaling.fit` (or, for a compound-scaling sweep, of
`scaling.compound`) as a report, JSON and plots.

    jaxscale fit (SWEEP_DIR | --csv POINTS.csv) [--budget C] [--json OUT.json] [--plots DIR]
    jaxscale fit SWEEP_DIR [--compound] [--metric accuracy|loss] [--json OUT.json]

A sweep whose runs set model.scale.phi > 0 is fitted as compound scaling without --compound.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import numpy as np
import yaml

from jaxscale.data.shards import write_atomic
from jaxscale.errors import ConfigError
from jaxscale.scaling import compound
from jaxscale.scaling.fit import (
    PARAMS,
    IsoFlopFit,
    LawFit,
    fit_isoflop,
    fit_law,
    read_csv,
    read_sweep,
    suggest_shape,
)

LAW_NAMES = ("E", "A", "alpha", "B", "beta")


def to_json(law: LawFit, iso: IsoFlopFit | None, budget: float | None = None,
            shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fits as JSON-ready numbers: E, A, alpha, B, beta, their `*_ci`, isoflop_a (None
    without an IsoFLOP fit), and with a budget N_opt, D_opt, N_opt_ci, D_opt_ci (and `shape`,
    `suggest_shape`'s answer for N_opt, when given)."""
    out: dict[str, Any] = {name: getattr(law, name) for name in LAW_NAMES}
    out |= {f"{name}_ci": list(getattr(law, f"{name}_ci")) for name in LAW_NAMES}
    out["isoflop_a"] = iso.a if iso else None
    if budget is not None:
        (out["N_opt"], out["D_opt"]), (N_ci, D_ci) = law.optimum(budget), law.optimum_ci(budget)
        out |= {"budget": budget, "N_opt_ci": list(N_ci), "D_opt_ci": list(D_ci)}
        if shape is not None:
            out["shape"] = shape
    return out


def format_report(law: LawFit, iso: IsoFlopFit | None, budget: float | None = None,
                  shape: dict[str, Any] | None = None) -> str:
    """The fits as text: the law with 95% intervals, the IsoFLOP exponent, and with a budget the
    optimal N and D (and `shape`'s overrides, when given)."""
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta   (95% bootstrap intervals, "
             f"{len(law.bootstrap_K5)} resamples)"]
    lines += [f"  {name:5s} = {getattr(law, name):.4g}  [{low:.4g}, {high:.4g}]"
              for name in LAW_NAMES for low, high in [getattr(law, f"{name}_ci")]]
    rms = float(np.sqrt(np.mean(law.residuals_P**2)))
    lines.append(f"  rms log residual {rms:.4f} over {len(law.residuals_P)} points")
    lines.append(f"  N_opt ∝ C^{law.beta / (law.alpha + law.beta):.3f} (beta / (alpha + beta))")
    if iso:
        lines.append(f"isoflop: N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f} "
                     f"({len(iso.budgets)} budgets)")
        lines += [f"  skipped {note}" for note in iso.notes]
    if budget is not None:
        (N_opt, D_opt), (N_ci, D_ci) = law.optimum(budget), law.optimum_ci(budget)
        lines.append(f"at C = {budget:.3g} FLOPs: N_opt = {N_opt:.3g} [{N_ci[0]:.3g}, "
                     f"{N_ci[1]:.3g}], D_opt = {D_opt:.3g} [{D_ci[0]:.3g}, {D_ci[1]:.3g}], "
                     f"loss {float(law.loss(N_opt, D_opt)):.4f}")
        if iso:
            lines.append("  isoflop: N_opt = {:.3g}, D_opt = {:.3g}".format(*iso.optimum(budget)))
        if shape is not None:
            lines.append(f"  shape (N = {shape['N']:.3g}): {' '.join(shape['overrides'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# `jaxscale fit`.


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the `fit` subcommand to the main CLI's subparsers."""
    p = sub.add_parser("fit", help="fit scaling laws to a sweep's final losses",
                       description="Fit L(N, D) = E + A/N^alpha + B/D^beta and IsoFLOP "
                                   "parabolas to a sweep's runs (or a CSV of N, D, C, loss).")
    p.add_argument("sweep_dir", nargs="?", default=None, help="folder of run workdirs")
    p.add_argument("--csv", default=None, metavar="POINTS.csv", help="points instead of a sweep")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the fit as JSON")
    p.add_argument("--budget", type=float, default=None, metavar="C",
                   help="training FLOPs to plan for, e.g. 1e21")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="where the PNGs go (default: SWEEP_DIR, or the CSV's folder)")
    p.add_argument("--params", choices=PARAMS, default="non_embedding", help="N of a sweep")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals")
    p.add_argument("--compound", action="store_true",
                   help="fit the metric against FLOPs per model.scale direction (the default "
                        "for a sweep whose runs set model.scale.phi > 0)")
    p.add_argument("--metric", choices=compound.METRICS, default="accuracy",
                   help="compound: final eval accuracy or loss (default: accuracy)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="for the suggested shape (default: the sweep's model.vocab_size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="for the suggested shape (default: the sweep's seq_len)")
    p.set_defaults(func=cmd_fit, parser=p)
    return p


def _sweep_model(sweep_dir: str) -> tuple[int | None, int | None]:
    """(model.vocab_size, seq_len) of the sweep's first run with a config.yaml."""
    for config_path in sorted(pathlib.Path(sweep_dir).glob("*/config.yaml")):
        config = yaml.safe_load(config_path.read_text())
        return config.get("model", {}).get("vocab_size"), config.get("seq_len")
    return None, None


def cmd_fit(args: argparse.Namespace) -> int:
    """`jaxscale fit`: read the points, fit, print the report, write the JSON and the plots."""
    from jaxscale.scaling.plots import plot_all

    if (args.sweep_dir is None) == (args.csv is None):
        raise ConfigError("fit takes a SWEEP_DIR or --csv POINTS.csv (one of the two)")
    if args.sweep_dir and (args.compound or compound.is_compound_sweep(args.sweep_dir)):
        return _fit_compound(args)
    vocab_size, seq_len = args.vocab_size, args.seq_len
    if args.csv:
        points, folder = read_csv(args.csv), pathlib.Path(args.csv).parent
    else:
        points, skipped = read_sweep(args.sweep_dir, args.params)
        folder = pathlib.Path(args.sweep_dir)
        if skipped:
            print(f"skipped (no final eval loss): {', '.join(skipped)}")
        swept_vocab, swept_seq_len = _sweep_model(args.sweep_dir)
        vocab_size, seq_len = vocab_size or swept_vocab, seq_len or swept_seq_len
    law = fit_law(points, bootstrap=args.bootstrap)
    try:
        iso = fit_isoflop(points)
    except ConfigError as e:
        print(f"no isoflop fit: {e}")
        iso = None
    shape = None
    if args.budget is not None and vocab_size and seq_len:
        shape = suggest_shape(law.optimum(args.budget)[0], vocab_size=vocab_size,
                              seq_len=seq_len)
    print(format_report(law, iso, args.budget, shape))
    if args.json:
        write_atomic(pathlib.Path(args.json),
                     (json.dumps(to_json(law, iso, args.budget, shape), indent=2) + "\n").encode())
    for path in plot_all(points, law, iso, args.plots or folder):
        print(f"wrote {path}")
    return 0


def _fit_compound(args: argparse.Namespace) -> int:
    """`jaxscale fit` of a compound-scaling sweep: a line per direction, report, JSON, plot."""
    from jaxscale.scaling.plots import plot_compound

    if args.budget is not None:
        raise ConfigError("--budget sizes a language model's N and D from L(N, D); a "
                          "compound-scaling sweep is compared at the C its directions share")
    runs, skipped = compound.read_compound(args.sweep_dir)
    if skipped:
        print(f"skipped (no final eval loss): {', '.join(skipped)}")
    fit = compound.fit_compound(runs, args.metric)
    print(compound.format_report(fit))
    if args.json:
        write_atomic(pathlib.Path(args.json), (json.dumps(fit.to_json(), indent=2) + "\n").encode())
    print(f"wrote {plot_compound(fit, args.plots or args.sweep_dir)}")
    return 0
