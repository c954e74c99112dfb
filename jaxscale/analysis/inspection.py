"""`jaxscale inspect`: compile the train step without running it, and say what it will cost.

    report = inspect_config(config.load("llama-1b", ["mesh.fsdp=8"]))
    print(report.format())

Everything is abstract: the state is `jax.eval_shape`'d, the step is lowered with
`jax.ShapeDtypeStruct`s that carry the shardings, and compiled; nothing is allocated on any device.
The report holds, per device: every parameter's shard (the sharding report), the parameter,
optimizer-state and activation/temporary bytes of the compiled step (XLA's memory analysis), the
FLOPs per step, the collectives of the partitioned HLO (count and bytes per kind), whether the
donated state really aliases the new state, and warnings: large replicated parameters and XLA's
"involuntary full rematerialization" (a resharding that gathers the whole tensor first). A
pipelined step adds its schedule's bubble (counted in its timetable), the chunk inputs a stage
holds at once and the bytes each device sends to its neighbour stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxscale.analysis import hlo, metrics
from jaxscale.config import Config
from jaxscale.core import pipeline
from jaxscale.core import sharding as shd
from jaxscale.core import state as state_lib
from jaxscale.core.units import format_bytes
from jaxscale.run.build import Run, build
from jaxscale.tasks import staged_objective

# A parameter replicated on every device is worth a warning from this size up (bytes).
REPLICATED_WARN_BYTES = 1 << 20


@contextlib.contextmanager
def capture_stderr() -> Iterator[list[str]]:
    """Capture what C++ code (XLA's logging) writes to file descriptor 2 while in the block.

    Yields a list that holds the captured text after the block. The text is also passed on to
    the real stderr, so nothing the user would have seen is lost.
    """
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            out.append(text)
            if text:
                os.write(2, text.encode())


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A train step compiled for a run, abstractly, and what it is made of."""

    run: Run  # the wiring (`jaxscale.run.build`)
    compiled: Any  # jax.stages.Compiled
    compile_s: float  # seconds spent lowering and compiling
    log: str  # what XLA logged while compiling
    partitioned: str = ""  # the module after the SPMD partitioner, on the CPU (`hlo` docstring)

    @functools.cached_property
    def text(self) -> str:
        """The compiled module's HLO text."""
        return self.compiled.as_text()

    def collectives(self) -> list[hlo.Collective]:
        """The step's collectives, with the element widths the partitioner gave them."""
        items = hlo.collectives(self.text, self.mesh.devices.size)
        return hlo.as_partitioned(items, self.partitioned)

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.run.mesh


def compile_run(run: Run) -> Compiled:
    """Lower and compile the run's train step from abstract shapes (nothing is allocated).

    On several CPU devices the partitioned module is kept too: the CPU backend widens bf16
    collectives after partitioning, which GPUs and TPUs do not (`hlo.as_partitioned`).
    """
    start = time.perf_counter()
    partitioned = ""
    with capture_stderr() as log:
        if run.mesh.devices.size > 1 and run.mesh.devices.flat[0].platform == "cpu":
            compiled, partitioned = hlo.compile_partitioned(run.lower())
        else:
            compiled = run.lower().compile()
    return Compiled(run, compiled, time.perf_counter() - start, log[0] if log else "",
                    partitioned)


def compile_step(cfg: Config, mesh: jax.sharding.Mesh | None = None, *, model: Any = None
                 ) -> Compiled:
    """Build `cfg`'s run (`jaxscale.run.build`) and compile its train step abstractly.

    Raises:
      ConfigError / ShardingError: the same checks as training, before compiling.
    """
    return compile_run(build(cfg, model, mesh=mesh))


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    params: int  # parameters (from the shardings)
    optimizer: int  # optimizer state (from the shardings)
    other_state: int  # step counters and other collections
    batch: int  # one batch's shard
    temps: int  # activations and other temporaries of the compiled step (XLA)
    arguments: int  # everything passed in (XLA)
    outputs: int  # everything returned (XLA)
    aliased: int  # outputs that reuse donated inputs (XLA)
    peak: int  # arguments + outputs + temps - aliased (XLA)


@dataclasses.dataclass(frozen=True)
class PipelineReport:
    """What a pipelined step's schedule costs (`pipeline_report`)."""

    schedule: str
    stages: int
    microbatches: int
    virtual_stages: int
    ticks: int  # of the step's timetable (forward-only for gpipe and circular)
    idle_slots: int  # stage-ticks with nothing to do, counted in the timetable
    bubble_fraction: float  # idle_slots / (ticks x stages)
    bubble_formula: float  # (S-1)/(V*M+S-1)
    in_flight: int  # chunk inputs a stage holds at once (all of them until an autodiff backward)
    transfer_bytes: int  # one microbatch's activation shard, sent stage to stage (per device)
    transfers: int  # sends per stage per step (one per tick and direction)

    @property
    def stage_bytes(self) -> int:
        """Bytes each device sends to its neighbour stage per step."""
        return self.transfer_bytes * self.transfers

    def format(self) -> str:
        fb = format_bytes
        return "\n".join([
            f"pipeline: {self.schedule} over {self.stages} stages, {self.microbatches} "
            f"microbatches x {self.virtual_stages} virtual stage(s)",
            f"  bubble            {self.bubble_fraction:>11.1%}   ({self.idle_slots} idle of "
            f"{self.ticks * self.stages} stage-ticks; (S-1)/(V*M+S-1) = {self.bubble_formula:.1%})",
            f"  in flight         {self.in_flight:>12}   (chunk inputs a stage holds at once)",
            f"  stage-to-stage    {fb(self.stage_bytes):>12}   per device per step "
            f"({self.transfers} sends of {fb(self.transfer_bytes)})",
        ])


def pipeline_report(run: Run) -> PipelineReport | None:
    """The schedule's bubble, in-flight count and stage-to-stage bytes; None unpipelined."""
    spec = run.pipeline
    if spec is None:
        return None
    table = spec.table()
    staged = staged_objective(run.task, run.model)
    micro = {k: jax.ShapeDtypeStruct((f.shape[0] // spec.microbatches, *f.shape[1:]), f.dtype)
             for k, f in run.batch_spec.items()}
    params = state_lib.unbox(run.abstract).params
    x = jax.eval_shape(lambda p, b: staged.embed(p, b, None, False), params, micro)
    first = next(iter(run.batch_shardings.values()))
    batch_parts = math.prod(run.mesh.shape[a] for a in shd.axes_of(first.spec[0]))
    return PipelineReport(
        schedule=spec.schedule, stages=spec.stages, microbatches=spec.microbatches,
        virtual_stages=spec.virtual_stages, ticks=table.ticks, idle_slots=table.idle_slots,
        bubble_fraction=table.bubble_fraction,
        bubble_formula=pipeline.bubble_formula(spec.stages, spec.microbatches,
                                               spec.virtual_stages),
        in_flight=table.in_flight, transfer_bytes=x.size * x.dtype.itemsize // batch_parts,
        transfers=pipeline.stage_transfers(table),
    )


@dataclasses.dataclass(frozen=True)
class Inspection:
    rows: list[shd.ReportRow]  # the sharding report, one row per state leaf
    memory: Memory
    flops_per_step: float  # model FLOPs per step, all devices (the task's formula, else XLA's)
    flops_source: str  # "model" (the task's causal count) or "XLA" (cost analysis)
    xla_flops_per_device: float | None  # XLA's count for the compiled step (loops counted once)
    collectives: list[hlo.Collective]
    warnings: list[str]
    num_devices: int
    mesh_shape: dict[str, int]
    compile_s: float
    pipeline: PipelineReport | None = None
    num_params: int = 0  # parameters of the model (all of them, unsharded)
    units_per_step: int = 0  # tokens (or examples) per step
    unit: str = "tokens"  # what the task counts
    input_shape: tuple[int, ...] = ()  # one example's shape (classify: after compound scaling)

    def collective_summary(self) -> dict[str, hlo.KindSummary]:
        return hlo.summarize(self.collectives)

    def format(self) -> str:
        fb = format_bytes
        m = self.memory
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items() if v > 1) or "1 device"
        lines = [f"mesh: {mesh} ({self.num_devices} devices); compiled in {self.compile_s:.1f}s",
                 "", shd.format_report(self.rows), "",
                 "memory per device (compiled step):",
                 f"  parameters        {fb(m.params):>12}",
                 f"  optimizer state   {fb(m.optimizer):>12}",
                 f"  other state       {fb(m.other_state):>12}",
                 f"  batch             {fb(m.batch):>12}",
                 f"  activations/temps {fb(m.temps):>12}   (XLA temp buffers)",
                 f"  peak              {fb(m.peak):>12}   (arguments {fb(m.arguments)} + outputs "
                 f"{fb(m.outputs)} + temps - donated/aliased {fb(m.aliased)})",
                 "", f"model: {self.num_params:,} parameters"
                 + (f"; inputs {'x'.join(map(str, self.input_shape))}" if self.input_shape
                    else ""),
                 f"FLOPs per step: {self.flops_per_step:.4g} ({self.flops_source} count; "
                 f"{self.flops_per_step / self.num_devices:.4g} per device; "
                 f"{self.flops_per_step / max(self.units_per_step, 1):.4g} per "
                 f"{self.unit.rstrip('s')})"]
        if self.xla_flops_per_device:
            lines.append(f"  XLA cost analysis: {self.xla_flops_per_device:.4g} per device "
                         "(counts a scanned layer loop's body once)")
        if self.pipeline is not None:
            lines += ["", self.pipeline.format()]
        lines += ["", "collectives per step, in the partitioned HLO's dtypes (what GPUs and TPUs "
                  "move; the CPU backend widens bf16 collectives to f32):",
                  hlo.format_collectives(self.collectives)]
        lines += ["", "warnings:" if self.warnings else "warnings: none"]
        lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect_compiled(c: Compiled, *, replicated_warn_bytes: int = REPLICATED_WARN_BYTES
                     ) -> Inspection:
    """The report of an already compiled step (see `compile_step`)."""
    run = c.run
    rows = shd.sharding_report(run.abstract, run.mesh, run.rules)
    stats = metrics.compiled_stats(c.compiled)
    by_part: dict[str, int] = {"params": 0, "opt_state": 0}
    other = 0
    for r in rows:
        head = r.path.split("/", 1)[0]
        if head in by_part:
            by_part[head] += r.bytes_per_device
        else:
            other += r.bytes_per_device
    batch_bytes = sum(
        shd.bytes_per_device(f.shape, f.dtype, run.batch_shardings[k])
        for k, f in run.batch_spec.items())
    memory = Memory(
        params=by_part["params"], optimizer=by_part["opt_state"], other_state=other,
        batch=batch_bytes, temps=stats.temp_bytes, arguments=stats.argument_bytes,
        outputs=stats.output_bytes, aliased=stats.alias_bytes, peak=stats.peak_bytes,
    )
    num_devices = c.mesh.devices.size
    collectives = c.collectives()
    warnings = _warnings(rows, memory, c.log, num_devices, replicated_warn_bytes)
    per_example = run.flops_per_example()
    flops = (per_example * run.cfg.batch_size if per_example is not None
             else (stats.flops or 0.0) * num_devices)
    return Inspection(
        rows=rows, memory=memory, flops_per_step=flops,
        flops_source="model" if per_example is not None else "XLA",
        xla_flops_per_device=stats.flops, collectives=collectives, warnings=warnings,
        num_devices=num_devices, mesh_shape=dict(c.mesh.shape), compile_s=c.compile_s,
        pipeline=pipeline_report(run),
        num_params=sum(int(np.prod(r.shape)) for r in rows if r.path.startswith("params/")),
        units_per_step=run.cfg.batch_size * run.task.units_per_example(), unit=run.task.unit,
        input_shape=tuple(getattr(run.task, "input_shape", ())),
    )


def _warnings(rows, memory: Memory, log: str, num_devices: int, threshold: int) -> list[str]:
    out = []
    if num_devices > 1:
        for r in rows:
            replicated = all(t is None for t in r.spec) and r.bytes_per_device == r.total_bytes
            if r.path.startswith("params/") and replicated and r.total_bytes >= threshold:
                out.append(f"parameter {r.path} ({format_bytes(r.total_bytes)}) is replicated "
                           f"on all {num_devices} devices; shard it (e.g. sharding.rules=fsdp)")
    for line in hlo.involuntary_remats(log):
        out.append(f"XLA: {line[line.find(hlo.INVOLUNTARY_REMAT):][:300]}")
    state = memory.params + memory.optimizer + memory.other_state
    if memory.aliased < state:
        out.append(f"only {format_bytes(memory.aliased)} of the {format_bytes(state)} "
                   "train state per device is updated in place (donation); the rest is copied")
    return out


def inspect_config(cfg: Config, mesh: jax.sharding.Mesh | None = None, **kwargs) -> Inspection:
    """Compile `cfg`'s train step abstractly and report on it (see the module docstring)."""
    return inspect_compiled(compile_step(cfg, mesh), **kwargs)
