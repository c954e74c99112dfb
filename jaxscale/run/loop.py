"""The training loop: the compiled step and a list of hooks around it.

`train` builds the run (`run.build`), restores or initialises the state, and hands over to
`loop`, which dispatches one step after another and calls the hooks (`jaxscale.run.hooks`). The
loop never blocks on the step it has just dispatched: the metrics hook reads each step's metrics
after the next one is dispatched (one step late), so the device always has work queued.
Preemption is the loop's own business: after a stop signal the processes agree on a step, save
it and stop with `Preempted`. A goodput ledger (`jaxscale.run.goodput`) times the restore, the
input pipeline and the hooks' evaluation and saves, and records the segment in the workdir.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from jaxscale import config as config_lib
from jaxscale.analysis import metrics as metrics_lib
from jaxscale.checkpoint import Checkpointer
from jaxscale.config import Config
from jaxscale.core.state import TrainState, num_params
from jaxscale.core.units import format_bytes
from jaxscale.errors import Preempted
from jaxscale.run import hooks as hooks_lib
from jaxscale.run.build import Run, build
from jaxscale.run.goodput import Ledger, TimedIterator
from jaxscale.run.preemption import StopSignal
from jaxscale.run.watchdog import start_watchdog


def train(cfg: Config, *, model: Any = None, task: Any = None,
          hooks: Sequence[Any] = ()) -> TrainState:
    """Train as `cfg` says; returns the final state.

    Args:
      cfg: a validated Config (`config.load`).
      model: a Flax Linen or NNX model or a ModelAdapter (`jaxscale.models.adapt`); default
        built from cfg.model.
      task: a Task (`jaxscale.tasks`); default the one cfg.task.name names.
      hooks: more hooks (`jaxscale.run.hooks`), called after the built-in ones at every step
        their ``when(step)`` accepts.

    Writes to `cfg.workdir`: config.yaml (the resolved config), metrics.jsonl, tensorboard/,
    summary.json and loss.png (when matplotlib is installed), goodput.jsonl and
    goodput.segment.json (`jaxscale.run.goodput`), and checkpoints/ (unless checkpoint.dir says
    otherwise), from whose latest complete step a rerun resumes.

    Raises:
      Preempted: SIGTERM or SIGINT stopped the run after a checkpoint committed.
    """
    wall_start = time.perf_counter()
    run = build(cfg, model, task)
    workdir = pathlib.Path(cfg.workdir)
    ledger = Ledger(workdir, enabled=jax.process_index() == 0, since=wall_start)
    train_data, eval_data = run.task.pipelines(cfg, run.batch_shardings)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        hooks_lib.write_atomic(workdir / "config.yaml", config_lib.to_yaml(cfg))
    with contextlib.ExitStack() as stack:
        stop = StopSignal()
        stack.callback(stop.close)
        ckpt = stack.enter_context(Checkpointer(cfg, run.mesh))
        with ledger.span("checkpoint"):
            state, rng, data_state = ckpt.restore_or_init(
                run.init_state, run.abstract, run.shardings,
                rng=jax.random.fold_in(jax.random.key(cfg.seed), 1),
                check_data=train_data.check_state,
            )
            start = int(jax.device_get(state.step))
        ledger.open(start)
        stack.push(ledger.exit)
        if start >= cfg.steps:  # a finished run: nothing to train, its summary stays
            ledger.discard()
            if jax.process_index() == 0:
                print(f"jaxscale: {workdir} already holds step {start} of steps={cfg.steps}; "
                      "nothing to train (raise steps= to continue, or pick a new workdir=)",
                      flush=True)
            return state
        batches = TimedIterator(train_data.iterator(start, state=data_state), ledger)
        first = next(batches)
        compile_start = time.perf_counter()
        compiled = run.lower(state, first, rng).compile()
        compile_s = time.perf_counter() - compile_start
        stats = metrics_lib.compiled_stats(compiled)
        logger = metrics_lib.MetricsLogger(workdir, total_steps=cfg.steps, start_step=start,
                                           progress=cfg.progress, enabled=jax.process_index() == 0)
        stack.callback(logger.close)
        logger.log(f"jaxscale: {num_params(state.params) / 1e6:.2f}M parameters on "
                   f"{jax.device_count()} devices, mesh {dict(run.mesh.shape)}; step compiled in "
                   f"{compile_s:.1f}s, {format_bytes(stats.peak_bytes)} per device")
        watchdog = start_watchdog(cfg.watchdog, workdir)
        stack.callback(watchdog.stop)
        all_hooks = [*default_hooks(run, stats, logger, batches, eval_data, ckpt, watchdog,
                                    ledger, compile_s=compile_s, wall_start=wall_start), *hooks]
        return loop(run, compiled, state, first, batches, rng, all_hooks, start, stop)


def default_hooks(run: Run, stats: metrics_lib.CompiledStats, logger: Any, batches: Any,
                  eval_data: Any, ckpt: Checkpointer, watchdog: Any, ledger: Ledger | None = None,
                  *, compile_s: float, wall_start: float) -> list[Any]:
    """The hooks `train` runs, in order: watchdog, metrics, evaluation, profile, checkpoint,
    goodput (with a ledger), summary, plot."""
    cfg = run.cfg
    throughput = hooks_lib.Throughput(
        unit=run.task.unit, units_per_step=cfg.batch_size * run.task.units_per_example(),
        flops_per_unit=flops_per_unit(run, stats), num_devices=jax.device_count(),
        peak=metrics_lib.peak_flops_per_device(),
    )
    evaluate = hooks_lib.every(cfg.eval_every, cfg.steps)
    log = hooks_lib.every(cfg.log_every, cfg.steps)
    metrics = hooks_lib.Metrics(logger, throughput, log_when=lambda s: log(s) or evaluate(s),
                                abort_nonfinite=cfg.on_nonfinite == "abort")
    eval_batches = [eval_data.batch(i) for i in range(cfg.eval_batches)]
    hooks: list[Any] = [
        hooks_lib.Watchdog(watchdog),
        metrics,
        hooks_lib.Evaluate(run, eval_batches, throughput, evaluate, ledger),
    ]
    if cfg.profile.steps:
        hooks.append(hooks_lib.Profile(tuple(cfg.profile.steps),
                                       pathlib.Path(cfg.workdir) / "profile"))
    hooks.append(hooks_lib.Checkpoint(ckpt, batches, metrics, throughput, ledger))
    goodput = None
    if ledger is not None:  # heartbeats where the metrics are read anyway
        goodput = hooks_lib.Goodput(ledger, heartbeat_when=metrics.log_when)
        hooks.append(goodput)
    hooks.append(hooks_lib.Summary(run, metrics, stats, compile_s, wall_start, goodput))
    hooks.append(hooks_lib.Plot(pathlib.Path(cfg.workdir), logger))
    return hooks


def flops_per_unit(run: Run, stats: metrics_lib.CompiledStats) -> float:
    """Training FLOPs per token (or example): the task's formula for a model it knows, else
    XLA's cost analysis of the compiled step (which counts a scanned loop's body once)."""
    per_example = run.flops_per_example()
    if per_example is None:  # XLA's count is per device and per step (batch_size examples)
        per_example = (stats.flops or 0.0) * jax.device_count() / run.cfg.batch_size
    return per_example / run.task.units_per_example()


def loop(run: Run, step_fn: Any, state: TrainState, batch: Any, batches: Iterator[Any],
         rng: jax.Array, hooks: Sequence[Any], start: int, stop: StopSignal) -> TrainState:
    """Steps `start` .. cfg.steps with the hooks around each; returns the final state.

    After a stop signal (agreed across processes, `StopSignal`) the checkpoint hook saves the
    step and the loop ends with `Preempted`; at the last step the run just finishes.
    """
    total = run.cfg.steps
    checkpoint = next(h for h in hooks if isinstance(h, hooks_lib.Checkpoint))
    for hook in hooks:
        getattr(hook, "start", lambda step: None)(start)
    ctx = None
    for step in range(start, total):
        state, metrics = step_fn(state, batch, rng)
        ctx = hooks_lib.StepContext(step + 1, state, metrics)
        for hook in hooks:
            if hook.when(ctx.step):
                hook(ctx)
        if stop.should_stop(ctx.step) and ctx.step < total:
            checkpoint(ctx, durable=True)
            checkpoint.end(ctx)  # waits for the save to commit
            raise Preempted(f"stopped on {stop.signal_name} after step {ctx.step}; checkpoint "
                            f"saved in {checkpoint.ckpt.directory}. Run the same command again "
                            "to resume")
        if ctx.step < total:
            batch = next(batches)
    for hook in hooks:
        getattr(hook, "end", lambda ctx: None)(ctx)
    return state
