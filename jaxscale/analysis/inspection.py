"""`jaxscale inspect`: compile the train step without running it, and say what it will cost.

    report = inspect_config(config.load("llama-1b", ["mesh.fsdp=8"]))
    print(report.format())

Everything is abstract: the state is `jax.eval_shape`'d, the step is lowered with
`jax.ShapeDtypeStruct`s that carry the shardings, and compiled; nothing is allocated on any device.
The report holds, per device: every parameter's shard (the sharding report), the parameter,
optimizer-state and activation/temporary bytes of the compiled step (XLA's memory analysis), the
FLOPs per step, the collectives of the partitioned HLO (count and bytes per kind), whether the
donated state really aliases the new state, and warnings: large replicated parameters and XLA's
"involuntary full rematerialization" (a resharding that gathers the whole tensor first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxscale.analysis import hlo, metrics
from jaxscale.config import Config
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.optim import make_optimizer, make_schedule
from jaxscale.core.state import abstract_state, unbox
from jaxscale.core.step import jit_step, make_train_step
from jaxscale.models import build_model

# The keys of a training batch as the data pipelines produce them (all [B, T] int32).
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")

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
    """A train step compiled for a config, abstractly, and what it is made of."""

    cfg: Config
    mesh: jax.sharding.Mesh
    rules: shd.LogicalRules
    abstract: Any  # the boxed abstract TrainState
    shardings: Any  # NamedSharding per state leaf
    compiled: Any  # jax.stages.Compiled
    compile_s: float  # seconds spent lowering and compiling
    log: str  # what XLA logged while compiling


def abstract_batch(cfg: Config, batch_sharding: jax.sharding.NamedSharding) -> dict:
    """ShapeDtypeStructs of one global training batch with its sharding."""
    shape = (cfg.batch_size, cfg.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding) for k in BATCH_KEYS}


def compile_step(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> Compiled:
    """Lower and compile the train step of `cfg` from abstract shapes (nothing is allocated).

    Args:
      cfg: a validated config; its mesh is built over `jax.devices()` unless `mesh` is given.

    Raises:
      ConfigError / ShardingError: the same checks as training, before compiling.
    """
    from jaxscale.run.loop import check_batch

    mesh = mesh or make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding.rules)
    shd.check_rules(rules, mesh)
    check_batch(cfg, mesh, rules)
    model = build_model(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.steps)
    abstract = abstract_state(model, tx, cfg.seq_len, cfg.seed)
    shardings = shd.state_shardings(abstract, mesh, rules)
    batch_sharding = shd.batch_sharding(mesh, rules)
    step = jit_step(
        make_train_step(model, tx, z_loss=cfg.z_loss, grad_accum=cfg.optim.grad_accum,
                        learning_rate_fn=make_schedule(cfg.optim, cfg.steps), mesh=mesh,
                        rules=rules),
        shardings, batch_sharding,
    )
    state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unbox(abstract), shardings
    )
    start = time.perf_counter()
    batch = abstract_batch(cfg, batch_sharding)
    with capture_stderr() as log:
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
    return Compiled(cfg, mesh, rules, abstract, shardings, compiled, time.perf_counter() - start,
                    log[0] if log else "")


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
class Inspection:
    rows: list[shd.ReportRow]  # the sharding report, one row per state leaf
    memory: Memory
    flops_per_step: float  # model FLOPs per step (causal count, all devices)
    xla_flops_per_device: float | None  # XLA's count for the compiled step (loops counted once)
    collectives: list[hlo.Collective]
    warnings: list[str]
    num_devices: int
    mesh_shape: dict[str, int]
    compile_s: float

    def collective_summary(self) -> dict[str, hlo.KindSummary]:
        return hlo.summarize(self.collectives)

    def format(self) -> str:
        fb = shd.format_bytes
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
                 "", f"FLOPs per step: {self.flops_per_step:.4g} (model, causal count; "
                 f"{self.flops_per_step / self.num_devices:.4g} per device)"]
        if self.xla_flops_per_device:
            lines.append(f"  XLA cost analysis: {self.xla_flops_per_device:.4g} per device "
                         "(counts a scanned layer loop's body once)")
        lines += ["", "collectives in the compiled HLO:", hlo.format_collectives(self.collectives)]
        lines += ["", "warnings:" if self.warnings else "warnings: none"]
        lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect_compiled(c: Compiled, *, replicated_warn_bytes: int = REPLICATED_WARN_BYTES
                     ) -> Inspection:
    """The report of an already compiled step (see `compile_step`)."""
    cfg = c.cfg
    rows = shd.sharding_report(c.abstract, c.mesh, c.rules)
    stats = metrics.compiled_stats(c.compiled)
    by_part: dict[str, int] = {"params": 0, "opt_state": 0}
    other = 0
    for r in rows:
        head = r.path.split("/", 1)[0]
        if head in by_part:
            by_part[head] += r.bytes_per_device
        else:
            other += r.bytes_per_device
    batch_sharding = shd.batch_sharding(c.mesh, c.rules)
    batch_bytes = len(BATCH_KEYS) * shd.bytes_per_device(
        (cfg.batch_size, cfg.seq_len), np.int32, batch_sharding)
    memory = Memory(
        params=by_part["params"], optimizer=by_part["opt_state"], other_state=other,
        batch=batch_bytes, temps=stats.temp_bytes, arguments=stats.argument_bytes,
        outputs=stats.output_bytes, aliased=stats.alias_bytes, peak=stats.peak_bytes,
    )
    num_devices = c.mesh.devices.size
    collectives = hlo.collectives(c.compiled.as_text(), num_devices)
    warnings = _warnings(rows, memory, c.log, num_devices, replicated_warn_bytes)
    flops = metrics.flops_per_token(cfg.model, cfg.seq_len).causal_per_token
    return Inspection(
        rows=rows, memory=memory, flops_per_step=flops * cfg.batch_size * cfg.seq_len,
        xla_flops_per_device=stats.flops, collectives=collectives, warnings=warnings,
        num_devices=num_devices, mesh_shape=dict(c.mesh.shape), compile_s=c.compile_s,
    )


def _warnings(rows, memory: Memory, log: str, num_devices: int, threshold: int) -> list[str]:
    out = []
    if num_devices > 1:
        for r in rows:
            replicated = all(t is None for t in r.spec) and r.bytes_per_device == r.total_bytes
            if r.path.startswith("params/") and replicated and r.total_bytes >= threshold:
                out.append(f"parameter {r.path} ({shd.format_bytes(r.total_bytes)}) is replicated "
                           f"on all {num_devices} devices; shard it (e.g. sharding.rules=fsdp)")
    for line in hlo.involuntary_remats(log):
        out.append(f"XLA: {line[line.find(hlo.INVOLUNTARY_REMAT):][:300]}")
    state = memory.params + memory.optimizer + memory.other_state
    if memory.aliased < state:
        out.append(f"only {shd.format_bytes(memory.aliased)} of the {shd.format_bytes(state)} "
                   "train state per device is updated in place (donation); the rest is copied")
    return out


def inspect_config(cfg: Config, mesh: jax.sharding.Mesh | None = None, **kwargs) -> Inspection:
    """Compile `cfg`'s train step abstractly and report on it (see the module docstring)."""
    return inspect_compiled(compile_step(cfg, mesh), **kwargs)
