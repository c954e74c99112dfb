"""`jaxscale plan`: pick a mesh and a remat policy for N devices before renting them.

For every candidate layout of N devices (data, fsdp, hybrid, fsdp x tensor, pipeline stages x
fsdp; see `candidates`) and remat policy, the train step is compiled ahead of time for N
simulated CPU devices from abstract shapes (nothing is allocated) and judged against a target
accelerator (`roofline.TARGETS`). Any built-in model is planned: the decoder, ViT, ResNet and
the CNN zoo (a model whose config has no `remat` field is tried without remat candidates):

* memory: XLA's memory analysis of the compiled step (arguments + outputs + temporaries -
  donated) against the target's HBM times `usable_fraction`;
* step time: the roofline of `analysis.roofline` (compute and communication overlapping fully,
  a pipeline's bubble stretching the compute).

The recommendation is the fitting candidate with the smallest step_s (ties: smaller
compute (bubble included) + comm, then less memory). docs/plan.md has the derivation and worked
examples.

GPU targets run attention as cuDNN's fused kernel, which the CPU compiler does not have; `plan`
compiles those with a stand-in of the same memory footprint (it keeps q, k, v, the output and the
log-sum-exp for the backward pass, never the [T, S] scores). On TPUs jaxscale uses XLA's attention,
so TPU targets are compiled with it, [T, S] scores included. ViT is always compiled with XLA's
attention, scores included: cuDNN has no kernel for some of its token counts (197 for ViT-B/16's
patches and class token), where it runs XLA's. Mixture-of-experts layers compile
their grouped matmuls as dense matmuls of the same shapes (`core.experts.footprint_standin`):
the CPU compiler would expand them over every expert, GPU and TPU kernels do not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxscale import config as config_lib
from jaxscale.analysis import metrics
from jaxscale.analysis.roofline import (
    TARGETS,
    Target,
    comm_seconds,
    compute_seconds,
    is_decoder,
    pipeline_trips,
    transformer_blocks,
)
from jaxscale.config import Config, ConfigError
from jaxscale.core import experts
from jaxscale.core import sharding as shd
from jaxscale.core.units import format_bytes
from jaxscale.errors import ShardingError
from jaxscale.vision_config import ViTConfig

# Remat policies tried by default, least memory first: a policy that does not fit stops the
# ones after it (they keep more). offload_dots is left out: the CPU compiler that plans cannot
# place buffers in the target's pinned host memory, so its memory would be misreported.
DEFAULT_REMATS = ("full", "minimal", "none")

# Mesh axes every candidate sets; expert, sequence and stage join them where candidates use them.
PLANNED_AXES = ("data", "fsdp", "tensor")
# From this many tokens per sequence on, candidates include context parallelism (ring).
LONG_SEQUENCE = 16384
# Pipeline stages tried (dividing the layers and the devices), and the schedule they run.
PIPELINE_STAGES = (2, 4, 8)
PIPELINE_SCHEDULE = "1f1b"


@dataclasses.dataclass(frozen=True)
class Candidate:
    # dp | fsdp | hsdp | fsdp_tp | ep (expert x fsdp) | cp (sequence x fsdp) | pp (stage x fsdp)
    strategy: str
    mesh: tuple[tuple[str, int], ...]  # mesh axis sizes that are not 1
    rules: str  # sharding rule preset
    remat: str  # remat policy ("": the model has no remat setting)
    axes: tuple[str, ...] = PLANNED_AXES  # mesh axes the overrides set
    context_parallel: str = "none"  # model.context_parallel
    stage_schedule: str = ""  # pipeline.schedule of a pp candidate ("": not pipelined)
    microbatches: int = 1  # pipeline.microbatches of a pp candidate

    @property
    def overrides(self) -> list[str]:
        sizes = dict(self.mesh)
        out = [f"mesh.{a}={sizes.get(a, 1)}" for a in self.axes]
        if self.context_parallel != "none":
            out.append(f"model.context_parallel={self.context_parallel}")
        if self.stage_schedule:
            out += [f"pipeline.schedule={self.stage_schedule}",
                    f"pipeline.microbatches={self.microbatches}"]
        out.append(f"sharding.rules={self.rules}")
        return out + ([f"model.remat={self.remat}"] if self.remat else [])

    @property
    def label(self) -> str:
        return " x ".join(f"{a}={n}" for a, n in self.mesh)


@dataclasses.dataclass
class Estimate:
    candidate: Candidate
    status: str  # "fits", "does not fit", or why it was not compiled
    state_bytes: int = 0  # params + optimizer state per device (sharding report)
    temp_bytes: int = 0  # activations/temporaries per device (XLA)
    peak_bytes: int = 0  # per device (XLA)
    compute_s: float = 0.0
    comm_s: float = 0.0
    collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    bubble: float = 0.0  # pipeline bubble: idle share of the stage-ticks (0 unpipelined)
    stage_bytes: int = 0  # bytes each device sends to its neighbour stages per step

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def pipelined_compute_s(self) -> float:
        """compute_s stretched by the bubble: the stages idle `bubble` of the step."""
        return self.compute_s / (1 - self.bubble)

    @property
    def step_s(self) -> float:
        return max(self.pipelined_compute_s, self.comm_s)

    model_s: float = 0.0  # the model FLOPs alone at peak (no recompute)

    @property
    def mfu_bound(self) -> float:
        """model_s / step_s: the MFU this estimate implies if compute ran at peak."""
        return 0.0 if not self.step_s else self.model_s / self.step_s


@dataclasses.dataclass
class Plan:
    cfg: Config
    num_devices: int
    target_name: str
    target: Target
    hbm_bytes: float
    usable_fraction: float
    estimates: list[Estimate]

    @property
    def best(self) -> Estimate | None:
        fitting = [e for e in self.estimates if e.fits]
        if not fitting:
            return None
        return min(fitting, key=lambda e: (round(e.step_s, 6), e.pipelined_compute_s + e.comm_s,
                                           e.peak_bytes))


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '74.5GiB' -> 74.5 * 2**30, '1024' -> 1024.0.

    Raises:
      ConfigError: not a number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--device-memory {text!r} is not a size; write e.g. 80GB or 74.5GiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def candidates(cfg: Config, num_devices: int, target: Target,
               remats: Sequence[str] = DEFAULT_REMATS) -> list[Candidate]:
    """Mesh layouts of `num_devices` worth trying, times the remat policies.

    dp (data=N); fsdp (fsdp=N); hsdp (fsdp over one or two nodes, data across them);
    fsdp_tp (tensor = 2, 4, 8 within a node when it divides `tensor_dims`, fsdp the rest; not
    for CNNs); for a mixture-of-experts model ep (expert = 2, 4, 8, ... dividing the experts, up
    to a node, fsdp the rest); from `LONG_SEQUENCE` tokens on cp (sequence = 2, 4, 8 within a
    node with the load-balanced ring, fsdp the rest); for a decoder with a scanned layer stack,
    no experts and no context parallelism pp (stage = 2, 4, 8 dividing the layers and the devices,
    fsdp the rest, the 1f1b schedule with `pipeline_microbatches` microbatches; see there).
    """
    m = cfg.model
    moe = getattr(m, "moe", None)
    experts = moe.num_experts if moe is not None else 0
    long = is_decoder(m) and cfg.seq_len >= LONG_SEQUENCE and hasattr(m, "context_parallel")
    axes = PLANNED_AXES + (("expert",) if experts else ()) + (("sequence",) if long else ())
    meshes: list[tuple[str, tuple[tuple[str, int], ...], str]] = [
        ("dp", (("data", num_devices),), "dp"),
        ("fsdp", (("fsdp", num_devices),), "fsdp"),
    ]
    node = min(target.devices_per_node, num_devices)
    for fsdp in (node, 2 * node):
        if fsdp < num_devices and num_devices % fsdp == 0:
            meshes.append(("hsdp", (("data", num_devices // fsdp), ("fsdp", fsdp)), "hsdp"))
    dims = tensor_dims(m)
    for tensor in (2, 4, 8) if dims else ():
        divides = all(n % tensor == 0 for n in dims)
        if tensor <= node and num_devices % tensor == 0 and num_devices > tensor and divides:
            meshes.append(("fsdp_tp", (("fsdp", num_devices // tensor), ("tensor", tensor)),
                           "fsdp_tp"))
    split = lambda n: (("fsdp", num_devices // n),) if num_devices > n else ()  # noqa: E731
    expert = 2
    while experts and expert <= min(experts, node) and num_devices % expert == 0:
        if experts % expert == 0:
            meshes.append(("ep", split(expert) + (("expert", expert),), "auto"))
        expert *= 2
    for sequence in (2, 4, 8) if long else ():
        if sequence <= node and num_devices % sequence == 0 and cfg.seq_len % (2 * sequence) == 0:
            meshes.append(("cp", split(sequence) + (("sequence", sequence),), "auto"))
    if not hasattr(m, "remat"):
        remats = ("",)
    out = [Candidate(s, mesh, rules, r, axes, "ring" if s == "cp" else "none")
           for s, mesh, rules in meshes for r in remats]
    pipelines = (getattr(m, "scan_layers", False) and not experts
                 and getattr(m, "context_parallel", "none") == "none")
    for stage in PIPELINE_STAGES if pipelines else ():
        if stage > num_devices or num_devices % stage or m.num_layers % stage:
            continue
        micro = pipeline_microbatches(cfg.batch_size, stage, num_devices // stage)
        if micro:
            out += [Candidate("pp", (("stage", stage),) + split(stage), "auto", r,
                              axes + ("stage",), stage_schedule=PIPELINE_SCHEDULE,
                              microbatches=micro) for r in remats]
    return out


def pipeline_microbatches(batch_size: int, stages: int, batch_shards: int) -> int:
    """The microbatches of a pp candidate: the largest of 4S, 2S and S that splits the batch
    into equal microbatches that `batch_shards` devices (the fsdp ones) share evenly; 0 if none
    does. More microbatches shrink the bubble, (S-1)/(M+S-1), at the price of smaller matmuls."""
    for micro in (4 * stages, 2 * stages, stages):
        if batch_size % micro == 0 and (batch_size // micro) % batch_shards == 0:
            return micro
    return 0


def tensor_dims(model_cfg) -> tuple[int, ...]:
    """The sizes tensor parallelism splits, which a tensor axis must divide: the decoder's heads,
    kv heads, MLP width and vocabulary; ViT's heads, MLP width and classes; () for other models,
    which get no tensor candidates (a CNN's channels are sharded by fsdp)."""
    m = model_cfg
    if is_decoder(m):
        return (m.num_heads, m.kv_heads, m.d_ff, m.vocab_size)
    if isinstance(m, ViTConfig):
        return (m.heads, m.mlp_width, m.num_classes)
    return ()


def _standin_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, implementation):
    """Same shapes, shardings and saved residuals as a flash kernel, no [T, S] scores.

    Only ever compiled (by `plan`), never run: its values are meaningless.
    """
    del segment_ids_BT, implementation
    group = q_BTNH.shape[2] // k_BSKH.shape[2]

    @jax.custom_vjp
    def attend(q, k, v):
        return _fwd(q, k, v)[0]

    def _fwd(q, k, v):
        out = q * jnp.repeat(v + k, group, axis=2)
        lse = jnp.sum(q.astype(jnp.float32), axis=-1)  # [B, T, N]: what the kernel keeps
        return out, (q, k, v, out, lse)

    def _bwd(res, g):
        q, k, v, out, lse = res
        g = g * out + lse[..., None].astype(g.dtype)
        B, T, N, H = g.shape
        g_BTKH = jnp.sum(g.reshape(B, T, N // group, group, H), axis=3)
        return g * q, g_BTKH * k, g_BTKH * v

    attend.defvjp(_fwd, _bwd)
    return attend(q_BTNH, k_BSKH, v_BSKH)


def evaluate(cfg: Config, cand: Candidate, num_devices: int, target: Target,
             limit_bytes: float) -> Estimate:
    """Compile one candidate abstractly and estimate its memory and step time."""
    from jaxscale.analysis.inspection import compile_run, pipeline_report
    from jaxscale.core.mesh import make_mesh
    from jaxscale.models import adapt
    from jaxscale.models.decoder import Decoder
    from jaxscale.run.build import build

    # Axes and settings a candidate does not name are reset, not inherited from `cfg`.
    unset = [f"mesh.{a}=1" for a in ("expert", "sequence", "stage") if a not in cand.axes]
    if cand.context_parallel == "none" and hasattr(cfg.model, "context_parallel"):
        unset.append("model.context_parallel=none")
    if cand.stage_schedule:
        unset.append("pipeline.virtual_stages=1")  # 1f1b runs one chunk per stage
    try:
        c_cfg = config_lib.load_tree(config_lib.to_dict(cfg), unset + cand.overrides)
    except ConfigError as e:
        return Estimate(cand, f"invalid: {e}")
    mesh = make_mesh(c_cfg.mesh, devices=jax.devices()[:num_devices])
    # GPU targets run cuDNN's fused attention, which the CPU compiler lacks: compile a stand-in
    # with its memory footprint (see the module docstring). The ring is compiled as it runs:
    # its blockwise softmax keeps no [T, S] scores either.
    standin = target.fused_attention and cand.context_parallel == "none"
    model = None  # other models: the one model.name names, attention as it runs (see above)
    if is_decoder(c_cfg.model):
        model = adapt(Decoder(c_cfg.model, attention_fn=_standin_attention if standin else None),
                      config=c_cfg.model)
    try:
        run = build(c_cfg, model, mesh=mesh)
    except (ConfigError, ShardingError) as e:
        return Estimate(cand, f"invalid: {e}")
    # Parameters + optimizer state from the shardings alone: no compile needed to reject.
    rows = shd.sharding_report(run.abstract, mesh, run.rules)
    state = sum(r.bytes_per_device for r in rows)
    grads = sum(r.bytes_per_device for r in rows if r.path.startswith("params/"))
    est = Estimate(cand, "", state_bytes=state)
    report = pipeline_report(run)
    if report is not None:
        est.bubble, est.stage_bytes = report.bubble_fraction, report.stage_bytes
    if state + grads > limit_bytes:  # the state and one gradient per parameter, at the least
        est.status = (f"does not fit (state {format_bytes(state)} + gradients "
                      f"{format_bytes(grads)} per device)")
        return est
    with experts.footprint_standin():  # the grouped-matmul kernels of GPUs and TPUs
        compiled = compile_run(run)
    stats = metrics.compiled_stats(compiled.compiled)
    est.temp_bytes, est.peak_bytes, est.compile_s = stats.temp_bytes, stats.peak_bytes, \
        compiled.compile_s
    est.status = "fits" if stats.peak_bytes <= limit_bytes else "does not fit"
    per_example = None if is_decoder(c_cfg.model) else (
        run.flops_per_example() or (stats.flops or 0.0) * num_devices / c_cfg.batch_size)
    est.compute_s, est.model_s = compute_seconds(c_cfg, cand.remat, num_devices, target,
                                                 flops_per_example=per_example)
    text = compiled.text
    collectives = compiled.collectives()
    if run.pipeline is not None:
        # The stage-to-stage sends are the tick loop's collective-permutes, already among these
        # collectives (trips = ticks; their bytes x trips = report.stage_bytes): they are priced
        # like every collective-permute (bytes / bandwidth of the link between neighbour stages)
        # and not added again. What is recounted is the layers' collectives (fsdp's gathers),
        # which run inside the tick loop's forward and backward branches.
        collectives = pipeline_trips(text, collectives, run.pipeline.table())
    est.comm_s, est.collective_bytes = comm_seconds(collectives, target)
    return est


def plan(cfg: Config, num_devices: int, target: str = "h100", *, device_memory: float | None = None,
         remats: Sequence[str] | None = None, usable_fraction: float = 0.9,
         log=None) -> Plan:
    """Evaluate every candidate for `num_devices` devices of `target` (see the module docstring).

    `remats` default to `DEFAULT_REMATS` (none for a model without a remat setting). Needs
    `num_devices` jax devices (the CLI simulates them on the CPU before jax starts).
    """
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is not known; choose one of: {', '.join(TARGETS)}")
    if len(jax.devices()) < num_devices:
        raise ConfigError(f"--devices {num_devices}: only {len(jax.devices())} devices are "
                          "visible (the CLI simulates them: jaxscale plan --devices N)")
    if remats is not None and not hasattr(cfg.model, "remat"):
        raise ConfigError(f"--remat {','.join(remats)}: model.name={cfg.model.name} has no remat "
                          "setting; leave --remat out")
    remats = DEFAULT_REMATS if remats is None else tuple(remats)
    for r in remats:
        if r not in config_lib.REMAT_POLICIES:
            raise ConfigError(f"--remat {r!r} is not a remat policy; choose from: "
                              f"{', '.join(config_lib.REMAT_POLICIES)}")
    t = TARGETS[target]
    hbm = device_memory or t.hbm_bytes
    limit = hbm * usable_fraction
    out = []
    for strategy_group in _group(candidates(cfg, num_devices, t, remats)):
        blocked = None
        for cand in strategy_group:
            if blocked is not None:
                out.append(Estimate(cand, f"does not fit (keeps more than {blocked}, which does "
                                          "not)", state_bytes=out[-1].state_bytes))
                continue
            est = evaluate(cfg, cand, num_devices, t, limit)
            out.append(est)
            if log is not None:
                log(format_row(est))
            if not est.fits:
                blocked = cand.remat
    return Plan(cfg, num_devices, target, t, hbm, usable_fraction, out)


def _group(cands: list[Candidate]) -> list[list[Candidate]]:
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        groups.setdefault((c.strategy, c.mesh), []).append(c)
    return list(groups.values())


def format_row(e: Estimate) -> str:
    fb = format_bytes
    c = e.candidate
    head = f"{c.strategy:<8} {c.label:<22} {c.remat or '-':<8}"
    if not e.compute_s:
        return f"{head} {e.status}"
    row = (f"{head} {'fits' if e.fits else 'NO FIT':<6} {fb(e.state_bytes):>11} "
           f"{fb(e.temp_bytes):>11} {fb(e.peak_bytes):>11} {_ms(e.compute_s):>9} "
           f"{_ms(e.comm_s):>9} {_ms(e.step_s):>9} {100 * e.mfu_bound:>5.1f}%")
    return row + (f"  bubble {100 * e.bubble:.1f}%" if e.bubble else "")


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


# What real steps reach of the peak-compute bound, by whether the model is a transformer.
_REACH = {True: "real steps reach ~40-55% of it",
          False: "convolutional networks reach well below a transformer's ~40-55% of it"}


def format_plan(p: Plan) -> str:
    """The candidates as a table, and the recommendation."""
    cfg = p.cfg
    if is_decoder(cfg.model):
        model = (f"{cfg.model.num_layers} layers x d_model {cfg.model.d_model}, batch "
                 f"{cfg.batch_size} x {cfg.seq_len} tokens")
        units, unit = cfg.batch_size * cfg.seq_len, "tokens"
    else:
        from jaxscale.tasks import make_task

        shape = "x".join(map(str, make_task(cfg).input_shape))
        model = f"model.name={cfg.model.name}, batch {cfg.batch_size} x {shape}"
        units, unit = cfg.batch_size, "examples"
    lines = [
        f"plan: {model} on {p.num_devices} x {p.target_name} "
        f"({p.target.description}); memory limit {format_bytes(p.hbm_bytes)} x "
        f"{p.usable_fraction:.2f}; peak {p.target.peak_flops / 1e12:.0f} TFLOP/s, links "
        f"{p.target.intra_bw / 1e9:.0f} GB/s in a node of {p.target.devices_per_node}, "
        f"{p.target.inter_bw / 1e9:.0f} GB/s across",
        f"{'strategy':<8} {'mesh':<22} {'remat':<8} {'memory':<6} {'state/dev':>11} "
        f"{'temps/dev':>11} {'peak/dev':>11} {'compute':>9} {'comm':>9} {'step':>9} "
        f"{'MFU':>6}",
        f"{'':<40}{'':<6} {'':>11} {'':>11} {'':>11} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9}",
    ]
    lines += [format_row(e) for e in p.estimates]
    blocks = transformer_blocks(cfg, p.target) is not None
    best = p.best
    if best is None:
        lines.append("recommendation: nothing fits; add devices, lower batch_size or seq_len")
    else:
        c = best.candidate
        lines.append(
            f"recommendation: {c.strategy} {c.label}" + (f", remat={c.remat}" if c.remat else "")
            + ": about "
            f"{_ms(best.step_s)} ms per step ({units / best.step_s:,.0f} {unit}/s at "
            f"{100 * best.mfu_bound:.0f}% MFU if compute ran at peak; {_REACH[blocks]}), "
            f"{format_bytes(best.peak_bytes)} per device"
            + (f", {100 * best.bubble:.1f}% pipeline bubble" if best.bubble else "")
            + "\n  jaxscale train "
            f"--config ... {' '.join(c.overrides)}")
    return "\n".join(lines)
