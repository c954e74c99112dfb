"""The training loop: glue between the modules, nothing more.

Build the mesh, the sharded state and the jitted step, then iterate. The loop never blocks on the
step it has just dispatched: each step's metrics are read after the next step is dispatched (one
step late), so the device always has work queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax

from jaxscale import config as config_lib
from jaxscale.analysis import metrics as metrics_lib
from jaxscale.checkpoint.manager import Checkpointer
from jaxscale.config import Config, ConfigError
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.optim import make_optimizer, make_schedule
from jaxscale.core.state import TrainState, abstract_state, init_state, num_params
from jaxscale.core.step import (
    eval_sums_zero,
    finish_eval,
    jit_eval_step,
    jit_step,
    make_eval_step,
    make_train_step,
)
from jaxscale.data import make_pipelines
from jaxscale.errors import NonFiniteError
from jaxscale.models import build_model
from jaxscale.run.watchdog import start_watchdog


def check_batch(cfg: Config, mesh: jax.sharding.Mesh, rules: shd.LogicalRules) -> None:
    """The (micro)batch and sequence must split evenly over the devices that shard them."""
    spec = shd.batch_sharding(mesh, rules).spec
    batch_axes = shd.axes_of(spec[0])
    parts = math.prod(mesh.shape[a] for a in batch_axes)
    micro = cfg.batch_size // cfg.optim.grad_accum
    if micro % parts:
        sizes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in batch_axes)
        what = (f"batch_size={cfg.batch_size}" if cfg.optim.grad_accum == 1 else
                f"the microbatch (batch_size={cfg.batch_size} / optim.grad_accum="
                f"{cfg.optim.grad_accum} = {micro})")
        raise ConfigError(
            f"{what} is not divisible by the {parts} devices that shard the batch ({sizes})"
        )
    seq_parts = math.prod(mesh.shape[a] for a in shd.axes_of(spec[1]))
    if cfg.seq_len % seq_parts:
        raise ConfigError(
            f"seq_len={cfg.seq_len} is not divisible by the {seq_parts} devices that shard the "
            "sequence (mesh.sequence)"
        )


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


@dataclasses.dataclass
class _Interval:
    """Throughput between two metric reads, excluding time spent evaluating or saving."""

    tokens_per_step: int
    flops_per_token: float
    num_devices: int
    peak: float
    last_time: float = 0.0
    last_step: int = 0
    paused: float = 0.0

    def start(self, step: int) -> None:
        self.last_time, self.last_step, self.paused = time.perf_counter(), step, 0.0

    def lap(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time - self.paused, 1e-9)
        steps = max(step - self.last_step, 1)
        self.last_time, self.last_step, self.paused = now, step, 0.0
        tokens_per_sec = self.tokens_per_step * steps / elapsed
        flops = tokens_per_sec * self.flops_per_token / self.num_devices
        return {
            "step_time_s": elapsed / steps,
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": flops / 1e12,
            "mfu": flops / self.peak,
        }


def train(cfg: Config, *, model: nn.Module | None = None) -> TrainState:
    """Train as `cfg` says; returns the final state.

    Args:
      cfg: a validated Config (`config.load`).
      model: a Flax module following the jaxscale model interface; default built from cfg.model.

    Writes to `cfg.workdir`: config.yaml (the resolved config), metrics.jsonl, tensorboard/,
    summary.json and loss.png (when matplotlib is installed), and checkpoints/ (unless
    checkpoint.dir says otherwise), from whose latest complete step a rerun resumes.

    Raises:
      Preempted: SIGTERM or SIGINT stopped the run after a checkpoint committed.
    """
    with contextlib.ExitStack() as cleanup:
        return _train(cfg, model, cleanup)


def _train(cfg: Config, model: nn.Module | None, cleanup: contextlib.ExitStack) -> TrainState:
    wall_start = time.perf_counter()
    is_main = jax.process_index() == 0
    workdir = pathlib.Path(cfg.workdir)
    mesh = make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding.rules)
    shd.check_rules(rules, mesh)
    check_batch(cfg, mesh, rules)
    model = model or build_model(cfg.model)
    schedule = make_schedule(cfg.optim, cfg.steps)
    tx = make_optimizer(cfg.optim, cfg.steps)
    batch_sharding = shd.batch_sharding(mesh, rules)
    train_data, eval_data = make_pipelines(cfg, batch_sharding)

    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_atomic(workdir / "config.yaml", config_lib.to_yaml(cfg))
    abstract = abstract_state(model, tx, cfg.seq_len, cfg.seed)
    state_shardings = shd.state_shardings(abstract, mesh, rules)
    ckpt = cleanup.enter_context(Checkpointer(cfg, mesh))
    state, dropout_rng, data_state = ckpt.restore_or_init(
        lambda: init_state(model, tx, mesh, rules, seq_len=cfg.seq_len, seed=cfg.seed)[0],
        abstract, state_shardings, rng=jax.random.fold_in(jax.random.key(cfg.seed), 1),
        check_data=train_data.check_state,
    )
    step_fn = jit_step(
        make_train_step(
            model, tx, z_loss=cfg.z_loss, grad_accum=cfg.optim.grad_accum,
            learning_rate_fn=schedule, mesh=mesh, rules=rules,
        ),
        state_shardings, batch_sharding,
    )
    eval_step = make_eval_step(model, mesh=mesh, rules=rules)
    eval_fn = jit_eval_step(eval_step, state_shardings, batch_sharding)

    start_step = int(jax.device_get(state.step))
    if start_step >= cfg.steps:  # a finished run: nothing to train, its summary stays
        if is_main:
            print(f"jaxscale: {workdir} already holds step {start_step} of steps={cfg.steps}; "
                  "nothing to train (raise steps= to continue, or pick a new workdir=)",
                  flush=True)
        return state
    batches = train_data.iterator(start_step, state=data_state)
    first_batch = next(batches)
    compile_start = time.perf_counter()
    compiled = step_fn.lower(state, first_batch, dropout_rng).compile()
    compile_s = time.perf_counter() - compile_start
    stats = metrics_lib.compiled_stats(compiled)
    flops = metrics_lib.flops_per_token(cfg.model, cfg.seq_len)
    interval = _Interval(
        tokens_per_step=cfg.batch_size * cfg.seq_len,
        flops_per_token=flops.causal_per_token,
        num_devices=jax.device_count(),
        peak=metrics_lib.peak_flops_per_device(),
    )
    logger = metrics_lib.MetricsLogger(
        workdir, total_steps=cfg.steps, start_step=start_step,
        progress=cfg.progress, enabled=is_main,
    )
    logger.log(
        f"jaxscale: {num_params(state.params) / 1e6:.2f}M parameters on {jax.device_count()} "
        f"devices, mesh {dict(mesh.shape)}; step compiled in {compile_s:.1f}s, "
        f"{shd.format_bytes(stats.peak_bytes)} per device"
    )

    eval_batches = [eval_data.batch(i) for i in range(cfg.eval_batches)]

    eval_zero = eval_sums_zero(eval_step, state, eval_batches[0])

    def evaluate() -> float:
        sums = eval_zero
        for batch in eval_batches:
            sums = eval_fn(state, batch, sums)
        return finish_eval(sums)["loss"]

    def is_log_step(step: int) -> bool:
        return step % cfg.log_every == 0 or is_eval_step(step) or step == cfg.steps

    def is_eval_step(step: int) -> bool:
        return (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps

    profile = tuple(cfg.profile.steps)
    history: list[dict[str, Any]] = []
    pending: tuple[int, dict[str, Any], dict[str, Any]] | None = None

    def read(pending_step: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
        """Read one step's metrics (it finished long ago: the next one is already queued)."""
        if cfg.on_nonfinite == "abort" and not bool(jax.device_get(metrics["finite"])):
            raise NonFiniteError(
                f"non-finite loss or gradient at step {pending_step} (on_nonfinite=abort); the "
                "update was not applied. Lower optim.lr, raise optim.warmup_steps, or set "
                "on_nonfinite=skip to drop such updates"
            )
        if not is_log_step(pending_step):
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record = {"step": pending_step, **values, **interval.lap(pending_step), **extra}
        history.append(record)
        logger.write(record)

    interval.start(start_step)
    watchdog = start_watchdog(cfg.watchdog, workdir)
    cleanup.callback(watchdog.stop)
    batch = first_batch
    for step in range(start_step, cfg.steps):
        if profile and step == profile[0]:
            jax.profiler.start_trace(str(workdir / "profile"))
        state, metrics = compiled(state, batch, dropout_rng)
        watchdog.pet(step + 1, metrics["loss"])
        if pending is not None:
            read(*pending)
        done = step + 1
        extra: dict[str, Any] = {}
        if is_eval_step(done):
            jax.block_until_ready(state)  # the step's own time stays in the interval
            pause = time.perf_counter()
            extra["eval_loss"] = evaluate()
            interval.paused += time.perf_counter() - pause
        pending = (done, metrics, extra)
        if profile and done == profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if ckpt.should_save(done):
            read(*pending)  # a non-finite step raises here, before anything of it is saved
            pending = None
            ckpt.save(done, state, batches.get_state())  # raises Preempted after a stop signal
        if done < cfg.steps:
            batch = next(batches)
    if pending is not None:
        read(*pending)

    summary = _summary(cfg, history, stats, compile_s, time.perf_counter() - wall_start)
    if is_main:
        _write_atomic(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        logger.log(_format_summary(summary))
        _plot(workdir, logger)
    logger.close()
    return state


def _summary(cfg: Config, history: list[dict[str, Any]], stats, compile_s: float, wall_s: float):
    """Totals of the run. Throughput is total tokens over total step time, leaving out the first
    interval (it includes the input pipeline's warm-up) when there is more than one."""
    if not history:  # nothing left to train (e.g. resumed at the last step)
        return {"steps": cfg.steps, "final_loss": None, "final_eval_loss": None,
                "tokens_per_sec": 0.0, "mfu": 0.0, "peak_bytes_per_device": stats.peak_bytes,
                "compile_time_s": compile_s, "wall_time_s": wall_s}
    timed = history[1:] or history
    pairs = zip(history, history[1:], strict=False)
    steps = [r["step"] - p["step"] for p, r in pairs] or [history[0]["step"]]
    seconds = sum(n * r["step_time_s"] for n, r in zip(steps, timed, strict=True))
    tokens = sum(n * r["tokens_per_sec"] * r["step_time_s"]
                 for n, r in zip(steps, timed, strict=True))
    tokens_per_sec = tokens / max(seconds, 1e-9)
    # MFU is proportional to throughput: scale any record's ratio.
    mfu = tokens_per_sec * timed[-1]["mfu"] / max(timed[-1]["tokens_per_sec"], 1e-9)
    evals = [r for r in history if "eval_loss" in r]
    return {
        "steps": cfg.steps,
        "final_loss": history[-1]["loss"],
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu,
        "peak_bytes_per_device": stats.peak_bytes,
        "compile_time_s": compile_s,
        "wall_time_s": wall_s,
    }


def _format_summary(s: dict[str, Any]) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"done: {s['steps']} steps in {s['wall_time_s']:.0f}s | train loss {fmt(s['final_loss'])}"
        f" | eval loss {fmt(s['final_eval_loss'])} | {s['tokens_per_sec']:,.0f} tokens/s | "
        f"MFU {100 * s['mfu']:.1f}% | peak {shd.format_bytes(s['peak_bytes_per_device'])}"
        " per device"
    )


def _plot(workdir: pathlib.Path, logger: metrics_lib.MetricsLogger) -> None:
    from jaxscale.analysis.plot import plot_run

    try:
        logger.log(f"plot: {plot_run(workdir)}")
    except ImportError:
        logger.log("plot: skipped (pip install 'jaxscale[plot]' for matplotlib)")
