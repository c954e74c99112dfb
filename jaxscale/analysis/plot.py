"""PNGs: a run's train and eval loss (and eval accuracy, for classification) and throughput
against step (matplotlib); a test-time compute report's accuracy against samples per prompt."""

from __future__ import annotations

import os
import pathlib
from typing import Any


def save_figure(fig: Any, path: str | os.PathLike) -> pathlib.Path:
    """Write a matplotlib figure to `path` as a PNG whole or not at all (a temporary file, then
    a rename: a reader never sees half a PNG), and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Plot `<workdir>/metrics.jsonl` to `out` (default `<workdir>/loss.png`); returns the path.

    Raises:
      ImportError: matplotlib is not installed (pip install 'jaxscale[plot]').
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    import matplotlib

    from jaxscale.analysis.metrics import read_jsonl

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    metrics_file = workdir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist: is {workdir} a jaxscale workdir?")
    records = read_jsonl(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    accuracy = [(r["step"], r["eval_accuracy"]) for r in records
                if isinstance(r.get("eval_accuracy"), float)]
    unit = "examples" if any("examples_per_sec" in r for r in records) else "tokens"
    speed = [(r["step"], r[f"{unit}_per_sec"]) for r in records if f"{unit}_per_sec" in r]

    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax_loss.set_ylabel(f"loss (nats/{unit.rstrip('s')})")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper left")
    if accuracy:
        ax_accuracy = ax_loss.twinx()
        ax_accuracy.plot(*zip(*accuracy, strict=True), "s--", color="tab:red",
                         label="eval accuracy")
        ax_accuracy.set_ylabel("eval accuracy")
        ax_accuracy.set_ylim(0, 1)
        ax_accuracy.legend(loc="upper right")
    ax_loss.set_title(workdir.name)
    if speed:
        ax_speed.plot(*zip(*speed, strict=True), color="tab:green")
    ax_speed.set_ylabel(f"{unit}/s")
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    return save_figure(fig, out or workdir / "loss.png")


def plot_ttc(report: dict, out: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Plot a `jaxscale.ttc` report: accuracy against N (best-of-N, majority, oracle, greedy) and
    against the tokens generated per prompt; returns the path.

    Raises:
      ImportError: matplotlib is not installed (pip install 'jaxscale[plot]').
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ns = [r["n"] for r in rows]
    per_prompt = [r["tokens_per_prompt"] for r in rows]
    fig, (ax_n, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, xs in ((ax_n, ns), (ax_tokens, per_prompt)):
        ax.plot(xs, [r["majority"] for r in rows], "o-", label="majority vote")
        ax.plot(xs, [r["best_of_n"] for r in rows], "s-", label=f"best-of-N ({report['scorer']})")
        ax.plot(xs, [r["oracle"] for r in rows], "^--", color="gray", label="oracle (pass@N)")
        ax.axhline(report["greedy"], color="black", linestyle=":", label="greedy")
        ax.axhline(report["sample_accuracy"], color="tab:red", linestyle=":",
                   label="one sample (mean of all)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_n.set_xticks(ns, [str(n) for n in ns])
    ax_tokens.set_xticks(per_prompt, [f"{t:.0f}" for t in per_prompt])
    ax_tokens.minorticks_off()
    ax_n.set_xlabel("N (samples per prompt)")
    ax_n.set_ylabel("accuracy")
    ax_n.legend()
    ax_tokens.set_xlabel("tokens generated per prompt")
    fig.suptitle(title or f"{report['prompts']} prompts, temperature {report['temperature']:g}")
    return save_figure(fig, out)
