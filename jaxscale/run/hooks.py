"""The loop's hooks: everything around the compiled step, each behind a step condition.

A hook is an object with ``when(step) -> bool`` and ``__call__(ctx)``, called after every step
it wants (``ctx.step`` counts the steps done); it may also have ``start(step)`` (before the
first step) and ``end(ctx)`` (after the last). `default_hooks` returns the list the trainer
runs: watchdog, metrics (read one step late), evaluation, profiling, checkpointing, goodput,
summary. Hooks that spend time the loop is not stepping (evaluating, saving) time it into the
goodput ledger's buckets (`jaxscale.run.goodput`).
A feature is a new hook, never a branch in the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax

from jaxscale.analysis import metrics as metrics_lib
from jaxscale.core.step import eval_sums_zero, finish_eval
from jaxscale.core.units import format_bytes
from jaxscale.errors import NonFiniteError
from jaxscale.run import goodput as goodput_lib
from jaxscale.run.goodput import Ledger


@dataclasses.dataclass
class StepContext:
    step: int  # optimizer steps done
    state: Any  # the TrainState after them (not waited for)
    metrics: dict[str, jax.Array]  # the step's metrics, still on the device
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # host values to log


def every(n: int, last: int) -> Callable[[int], bool]:
    """Every `n` steps (never when n == 0) and at step `last`."""
    return lambda step: (n > 0 and step % n == 0) or step == last


def span(ledger: Ledger | None, bucket: str) -> contextlib.AbstractContextManager:
    """`ledger.span(bucket)`, or nothing without a ledger."""
    return contextlib.nullcontext() if ledger is None else ledger.span(bucket)


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


@dataclasses.dataclass
class Throughput:
    """Throughput between two metric reads, leaving out the time hooks spend (evaluating,
    saving), which they `pause()` for."""

    unit: str  # "tokens" or "examples"
    units_per_step: int
    flops_per_unit: float
    num_devices: int
    peak: float
    last_time: float = 0.0
    last_step: int = 0
    paused_s: float = 0.0

    def start(self, step: int) -> None:
        self.last_time, self.last_step, self.paused_s = time.perf_counter(), step, 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def lap(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time - self.paused_s, 1e-9)
        steps = max(step - self.last_step, 1)
        self.last_time, self.last_step, self.paused_s = now, step, 0.0
        per_sec = self.units_per_step * steps / elapsed
        flops = per_sec * self.flops_per_unit / self.num_devices
        return {"step_time_s": elapsed / steps, f"{self.unit}_per_sec": per_sec,
                "tflops_per_device": flops / 1e12, "mfu": flops / self.peak}


class Metrics:
    """Reads each step's metrics one step late (the next step is already queued), stops a
    non-finite run under on_nonfinite=abort, and writes the log steps' records."""

    def __init__(self, logger: metrics_lib.MetricsLogger, throughput: Throughput, *,
                 log_when: Callable[[int], bool], abort_nonfinite: bool):
        self.logger, self.throughput = logger, throughput
        self.log_when, self.abort_nonfinite = log_when, abort_nonfinite
        self.history: list[dict[str, Any]] = []
        self._pending: StepContext | None = None

    def when(self, step: int) -> bool:
        return True

    def start(self, step: int) -> None:
        self.throughput.start(step)

    def __call__(self, ctx: StepContext) -> None:
        self.flush()
        self._pending = ctx

    def flush(self) -> None:
        """Read the step still pending (a non-finite one raises here)."""
        ctx, self._pending = self._pending, None
        if ctx is None:
            return
        if self.abort_nonfinite and not bool(jax.device_get(ctx.metrics["finite"])):
            raise NonFiniteError(
                f"non-finite loss or gradient at step {ctx.step} (on_nonfinite=abort); the "
                "update was not applied. Lower optim.lr, raise optim.warmup_steps, or set "
                "on_nonfinite=skip to drop such updates"
            )
        if not self.log_when(ctx.step):
            return
        values = {k: float(v) for k, v in jax.device_get(ctx.metrics).items()}
        record = {"step": ctx.step, **values, **self.throughput.lap(ctx.step), **ctx.record}
        self.history.append(record)
        self.logger.write(record)

    def end(self, ctx: StepContext) -> None:
        self.flush()


class Evaluate:
    """Held-out sums over the same `eval_batches` batches at every evaluation step."""

    def __init__(self, run: Any, batches: list[Any], throughput: Throughput,
                 when: Callable[[int], bool], ledger: Ledger | None = None):
        self.run, self.batches, self.throughput, self.when = run, batches, throughput, when
        self.ledger = ledger
        self._zero = None

    def __call__(self, ctx: StepContext) -> None:
        jax.block_until_ready(ctx.state)  # the step's own time stays in the interval
        with self.throughput.pause(), span(self.ledger, "evaluation"):
            if self._zero is None:
                self._zero = eval_sums_zero(self.run.eval_fn, ctx.state, self.batches[0])
            sums = self._zero
            for batch in self.batches:
                sums = self.run.eval_step(ctx.state, batch, sums)
            ctx.record.update({f"eval_{k}": v for k, v in finish_eval(sums).items()})


class Profile:
    """A jax.profiler trace of the steps [start, stop)."""

    def __init__(self, steps: tuple[int, ...], directory: pathlib.Path):
        self.steps, self.directory = steps, directory

    def when(self, step: int) -> bool:
        return step in self.steps

    def start(self, step: int) -> None:
        if self.steps[0] == step:
            jax.profiler.start_trace(str(self.directory))

    def __call__(self, ctx: StepContext) -> None:
        if ctx.step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
        else:
            jax.block_until_ready(ctx.state)
            jax.profiler.stop_trace()


class Watchdog:
    """Tells the hang watchdog about every dispatched step."""

    def __init__(self, watchdog: Any):
        self.watchdog = watchdog

    def when(self, step: int) -> bool:
        return True

    def __call__(self, ctx: StepContext) -> None:
        self.watchdog.pet(ctx.step, ctx.metrics["loss"])


class Checkpoint:
    """Saves at the checkpoint interval and the last step; the pending metrics are read first,
    so a non-finite step raises before anything of it is saved. At the end it waits for the
    last save to commit (before the summary, so that the wait is counted)."""

    def __init__(self, ckpt: Any, batches: Any, metrics: Metrics, throughput: Throughput,
                 ledger: Ledger | None = None):
        self.ckpt, self.batches, self.metrics, self.throughput = ckpt, batches, metrics, throughput
        self.ledger = ledger

    def when(self, step: int) -> bool:
        return self.ckpt.should_save(step)

    def __call__(self, ctx: StepContext, *, durable: bool = False) -> None:
        """Save `ctx.step`; with `durable` (a stop signal) to the durable tier even when the
        interval saved it to the local one."""
        self.metrics.flush()
        done = self.ckpt.durable_step if durable else self.ckpt.saved_step
        if done == ctx.step:  # (a stop at a step the interval saved)
            return
        with self.throughput.pause(), span(self.ledger, "checkpoint"):
            self.ckpt.save(ctx.step, ctx.state, self.batches.get_state(), durable=durable)
        if self.ledger is not None:
            self.ledger.mark(ctx.step)

    def end(self, ctx: StepContext) -> None:
        with span(self.ledger, "checkpoint"):
            self.ckpt.wait()


class Goodput:
    """Tells the goodput ledger about every dispatched step (a heartbeat at the steps
    `heartbeat_when` accepts); at the end closes the segment and sums every segment so far
    (`totals`, for the summary)."""

    def __init__(self, ledger: Ledger, heartbeat_when: Callable[[int], bool]):
        self.ledger, self.heartbeat_when = ledger, heartbeat_when
        self.totals: dict[str, Any] | None = None

    def when(self, step: int) -> bool:
        return True

    def start(self, step: int) -> None:
        self.ledger.begin_steps()

    def __call__(self, ctx: StepContext) -> None:
        self.ledger.step(ctx.step, heartbeat=self.heartbeat_when(ctx.step))

    def end(self, ctx: StepContext) -> None:
        self.totals = self.ledger.finish("done")


class AtEnd:
    """A hook that only acts after the last step (`end`)."""

    def when(self, step: int) -> bool:
        return False

    def __call__(self, ctx: StepContext) -> None:
        pass


class Summary(AtEnd):
    """At the end: summary.json and the closing line (process 0), with the goodput of every
    segment so far when a `Goodput` hook ran before this one."""

    def __init__(self, run: Any, metrics: Metrics, stats: metrics_lib.CompiledStats,
                 compile_s: float, wall_start: float, goodput: Goodput | None = None):
        self.run, self.metrics, self.stats = run, metrics, stats
        self.compile_s, self.wall_start, self.goodput = compile_s, wall_start, goodput

    def end(self, ctx: StepContext) -> None:
        cfg, logger = self.run.cfg, self.metrics.logger
        summary = summarize(cfg.steps, self.metrics.history, self.run.task.unit, self.stats,
                            self.compile_s, time.perf_counter() - self.wall_start)
        summary.update(self.totals())
        accounted = self.goodput.totals if self.goodput is not None else None
        line = format_summary(summary, self.run.task.unit)
        if accounted is not None:
            summary["goodput"] = goodput_lib.summary(accounted)
            line += f" | {goodput_lib.headline(accounted)}"
        if jax.process_index() == 0:
            workdir = pathlib.Path(cfg.workdir)
            write_atomic(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
            logger.log(line)


    def totals(self) -> dict[str, Any]:
        """What a scaling law needs of the run: parameters (all, and without the embedding
        tables: `metrics.parameter_counts`), the tokens (or examples) trained on, and the
        training FLOPs, `flops_per_unit` x those units (the model count of docs/metrics.md;
        remat's recompute is not counted)."""
        total, non_embedding = metrics_lib.parameter_counts(
            nn.unbox(self.run.abstract.params))
        throughput = self.metrics.throughput
        seen = self.run.cfg.steps * throughput.units_per_step
        return {"params_total": total, "params_non_embedding": non_embedding,
                f"{throughput.unit}_seen": seen, "train_flops": seen * throughput.flops_per_unit}


class Plot(AtEnd):
    """At the end: metrics.jsonl -> loss.png (process 0; needs matplotlib)."""

    def __init__(self, workdir: pathlib.Path, logger: metrics_lib.MetricsLogger):
        self.workdir, self.logger = workdir, logger

    def end(self, ctx: StepContext) -> None:
        if jax.process_index() != 0:
            return
        from jaxscale.analysis.plot import plot_run

        try:
            self.logger.log(f"plot: {plot_run(self.workdir)}")
        except ImportError:
            self.logger.log("plot: skipped (pip install 'jaxscale[plot]' for matplotlib)")


def summarize(steps: int, history: list[dict[str, Any]], unit: str, stats: Any,
              compile_s: float, wall_s: float) -> dict[str, Any]:
    """Totals of the run. Throughput is total units over total step time, leaving out the
    first interval (it includes the input pipeline's warm-up) when there is more than one."""
    rate = f"{unit}_per_sec"
    common = {"peak_bytes_per_device": stats.peak_bytes, "compile_time_s": compile_s,
              "wall_time_s": wall_s}
    if not history:  # nothing left to train (e.g. resumed at the last step)
        return {"steps": steps, "final_loss": None, "final_eval_loss": None, rate: 0.0,
                "mfu": 0.0, **common}
    timed = history[1:] or history
    pairs = zip(history, history[1:], strict=False)
    counts = [r["step"] - p["step"] for p, r in pairs] or [history[0]["step"]]
    seconds = sum(n * r["step_time_s"] for n, r in zip(counts, timed, strict=True))
    units = sum(n * r[rate] * r["step_time_s"] for n, r in zip(counts, timed, strict=True))
    per_sec = units / max(seconds, 1e-9)
    # MFU is proportional to throughput: scale any record's ratio.
    mfu = per_sec * timed[-1]["mfu"] / max(timed[-1][rate], 1e-9)
    evals = [r for r in history if "eval_loss" in r]
    # The last evaluation's accuracies (classify) sit beside its loss.
    accuracies = {f"final_{k}": v for k, v in (evals[-1] if evals else {}).items()
                  if k.startswith("eval_") and k.endswith("accuracy")}
    return {"steps": steps, "final_loss": history[-1]["loss"],
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None, **accuracies,
            rate: per_sec, "mfu": mfu, **common}


def format_summary(s: dict[str, Any], unit: str) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    accuracy = s.get("final_eval_accuracy")
    return (
        f"done: {s['steps']} steps in {s['wall_time_s']:.0f}s | train loss {fmt(s['final_loss'])}"
        f" | eval loss {fmt(s['final_eval_loss'])}"
        + ("" if accuracy is None else f" | eval accuracy {100 * accuracy:.2f}%")
        + f" | {s[f'{unit}_per_sec']:,.0f} {unit}/s | "
        f"MFU {100 * s['mfu']:.1f}% | peak {format_bytes(s['peak_bytes_per_device'])} per device"
    )
