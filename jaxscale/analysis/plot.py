"""A PNG of a run: train and eval loss, and tokens/s, against step (matplotlib)."""

from __future__ import annotations

import os
import pathlib

from jaxscale.analysis.metrics import read_jsonl


def plot_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Plot `<workdir>/metrics.jsonl` to `out` (default `<workdir>/loss.png`); returns the path.

    Raises:
      ImportError: matplotlib is not installed (pip install 'jaxscale[plot]').
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    metrics_file = workdir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist: is {workdir} a jaxscale workdir?")
    records = read_jsonl(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    speed = [(r["step"], r["tokens_per_sec"]) for r in records if "tokens_per_sec" in r]

    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(workdir.name)
    if speed:
        ax_speed.plot(*zip(*speed, strict=True), color="tab:green")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    out = pathlib.Path(out) if out else workdir / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
