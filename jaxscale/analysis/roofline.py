"""The roofline `jaxscale plan` judges a compiled step by: accelerator targets, compute and
communication seconds.

Step time assumes compute and communication overlap fully:

    compute_s = (model FLOPs + the policy's forward recompute) / devices / peak FLOP/s
                (1f1b pipelines add one forward of the layers: their backward reruns it)
    model FLOPs: the decoder's count (analysis.metrics.flops_per_token); for other models the
                task's formula (classify: 6 x the forward MACs of ViT and ResNet), else XLA's
                count of the compiled step. The recompute is priced on transformer blocks (the
                decoder's and ViT's: `RECOMPUTE`); other models have none
    comm_s    = sum over the collectives of the partitioned HLO of
                bytes x ring factor / bandwidth of the link the replica group spans
    step_s    = max(compute_s / (1 - bubble), comm_s)   (also reported: compute_s + comm_s)

bubble is 0 without pipeline stages; with them it is the idle share of the stage-ticks of the
schedule's timetable, (S-1)/(V*M+S-1), which stretches the compute: every stage computes 1/S of
the layers but idles that share of the step. Ring factors: all-gather, reduce-scatter,
all-to-all (n-1)/n; all-reduce 2(n-1)/n; collective-permute 1. A group within one node
(devices_per_node consecutive devices) uses the intra-node bandwidth (NVLink, ICI), one that
spans nodes the inter-node one (InfiniBand, DCN). All-reduces that only feed slices are priced
as the reduce-scatters GPUs and TPUs run. A pipelined step's stage-to-stage sends are the
collective-permutes of its tick loop (`pipeline_trips` counts the layers' collectives through
it). docs/plan.md has the derivation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from jaxscale import config as config_lib
from jaxscale.analysis import hlo, metrics
from jaxscale.config import Config
from jaxscale.core import pipeline
from jaxscale.vision_config import ViTConfig


@dataclasses.dataclass(frozen=True)
class Target:
    description: str  # what the numbers describe
    peak_flops: float  # dense bf16 FLOP/s per device (metrics.PEAK_FLOPS)
    hbm_bytes: float  # device memory
    devices_per_node: int  # devices joined by the fast intra-node links
    intra_bw: float  # bytes/s per device for one collective inside a node (NVLink / ICI)
    inter_bw: float  # bytes/s per device for a collective that spans nodes (IB / DCN)
    fused_attention: bool  # jaxscale runs a fused (flash) attention kernel there


_P = metrics.PEAK_FLOPS
# Bandwidths are per device and direction, as one collective over one mesh axis sees them:
# NVLink 4 = 900 GB/s bidirectional per H100 (450 each way); one 400 Gb/s InfiniBand NIC per GPU
# = 50 GB/s. A TPU ring over one torus axis uses 2 of the chip's ICI links: v5p 4.8 Tb/s over 6
# links -> 200 GB/s; v5e 1.6 Tb/s over 4 -> 100 GB/s; v4 2.4 Tb/s over 6 -> 100 GB/s; v6e
# 3.6 Tb/s over 4 -> 224 GB/s. A TPU slice is one ICI domain (devices_per_node = its size); slices
# talk over the data-centre network at ~25 GB/s per chip.
TARGETS: dict[str, Target] = {
    "h100": Target("NVIDIA H100 SXM 80GB, 8 per node on NVLink 4, 400G InfiniBand per GPU",
                   _P["H100"], 80e9, 8, 450e9, 50e9, True),
    "h200": Target("NVIDIA H200 141GB, 8 per node on NVLink 4, 400G InfiniBand per GPU",
                   _P["H200"], 141e9, 8, 450e9, 50e9, True),
    "a100": Target("NVIDIA A100 SXM 80GB, 8 per node on NVLink 3, 200G InfiniBand per GPU",
                   _P["A100"], 80e9, 8, 300e9, 25e9, True),
    "tpu-v4": Target("TPU v4 chip (32 GB), 3D-torus ICI", _P["TPU v4"], 32e9, 4096, 100e9, 25e9,
                     False),
    "tpu-v5e": Target("TPU v5e chip (16 GB), 2D-torus ICI", _P["TPU v5e"], 16e9, 256, 100e9,
                      25e9, False),
    "tpu-v5p": Target("TPU v5p chip (95 GB), 3D-torus ICI", _P["TPU v5p"], 95e9, 8960, 200e9,
                      25e9, False),
    "tpu-v6e": Target("TPU v6e chip (32 GB), 2D-torus ICI", _P["TPU v6e"], 32e9, 256, 224e9,
                      25e9, False),
}


# Forward pieces each policy recomputes in the backward pass (per layer). Pieces: qkv
# projections, attn (the two attention matmuls), out projection, mlp_in (up/gate), mlp_out.
RECOMPUTE: dict[str, tuple[str, ...]] = {
    "none": (),
    "save_dots": (),
    "full": ("qkv", "attn", "out", "mlp_in"),  # mlp_out's result is the next layer's saved input
    "minimal": ("attn",),  # dots with batch dims: the attention matmuls
    "save_qkv_proj": ("attn", "out", "mlp_in"),
    "save_attn_out": ("qkv", "attn", "out", "mlp_in"),
    "save_mlp": ("qkv", "attn", "out"),
    "offload_dots": ("attn",),
}


def is_decoder(model_cfg) -> bool:
    """The built-in decoder's config (the plan's language-model layouts: experts, context and
    pipeline parallelism)."""
    return isinstance(model_cfg, config_lib.ModelConfig)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The transformer blocks of a model, which the remat policies recompute parts of."""

    cfg: config_lib.ModelConfig  # the blocks' decoder config (ViT: `models.vit.decoder_config`)
    tokens: int  # per example
    causal: bool  # the attention computes only the unmasked half of the scores


def transformer_blocks(cfg: Config, target: Target) -> Blocks | None:
    """The decoder's blocks (causal where a fused kernel or the ring skips the masked half; XLA
    computes all), ViT's (bidirectional, over its patches and class token), or None."""
    m = cfg.model
    if is_decoder(m):
        causal = target.fused_attention or m.context_parallel == "ring"
        return Blocks(m, cfg.seq_len, causal)
    if isinstance(m, ViTConfig):
        from jaxscale.models import vit
        from jaxscale.tasks import make_task

        shape = make_task(cfg).input_shape
        gh, gw = vit.grid(m, shape)
        return Blocks(vit.decoder_config(m), gh * gw + (m.pool == "cls"), False)
    return None


def compute_seconds(cfg: Config, remat: str, num_devices: int, target: Target, *,
                    flops_per_example: float | None = None) -> tuple[float, float]:
    """(seconds of compute per step at peak incl. recompute, seconds of the model FLOPs alone).

    `flops_per_example` (training FLOPs of one example) is required for a model other than the
    decoder, whose count comes from `analysis.metrics.flops_per_token`."""
    m = cfg.model
    blocks = transformer_blocks(cfg, target)
    if is_decoder(m):
        flops = metrics.flops_per_token(m, cfg.seq_len)
        per_token = flops.causal_per_token if blocks.causal else flops.noncausal_per_token
        model_per_example = flops.causal_per_token * cfg.seq_len
        per_example = per_token * cfg.seq_len
    elif flops_per_example is None:
        raise ValueError(f"model.name={m.name}: compute_seconds needs flops_per_example")
    else:
        model_per_example = per_example = flops_per_example
    recompute = 0.0
    if blocks is not None:
        b = blocks.cfg
        L, D, F, T = b.num_layers, b.d_model, _active_mlp_width(b), blocks.tokens
        N, K, H = b.num_heads, b.kv_heads, b.head_size
        pieces = {"qkv": 2 * D * (N + 2 * K) * H,
                  "attn": 2 * T * N * H * (1 if blocks.causal else 2), "out": 2 * N * H * D,
                  "mlp_in": 2 * (2 if b.mlp == "swiglu" else 1) * D * F, "mlp_out": 2 * D * F}
        # FLOPs per token of every layer the policy reruns, times the tokens of an example
        recompute = L * T * sum(pieces[p] for p in RECOMPUTE.get(remat, ()))
        if cfg.mesh.stage > 1 and cfg.pipeline.schedule == "1f1b":
            # 1f1b keeps only a stage's input per microbatch: its backward recomputes the whole
            # stage forward (under jax.vjp), on top of what the remat policy recomputes inside.
            recompute += L * T * sum(pieces.values())
    scale = cfg.batch_size / num_devices / target.peak_flops
    return (per_example + recompute) * scale, model_per_example * scale


def _active_mlp_width(m) -> float:
    """The MLP width a token passes through, averaged over the layers (MoE: k routed + shared
    experts in the MoE layers)."""
    moe = m.moe
    if not moe.num_experts:
        return m.d_ff
    moe_layers = m.num_layers // moe.every_n_layers
    active = (moe.d_ff or m.d_ff) * (moe.top_k + moe.num_shared_experts)
    return ((m.num_layers - moe_layers) * m.d_ff + moe_layers * active) / m.num_layers


def comm_seconds(collectives: Sequence[hlo.Collective], target: Target) -> tuple[float, dict]:
    """Seconds per step of the collectives (see the module docstring) and bytes per kind."""
    total, by_kind = 0.0, {k: 0 for k in hlo.KINDS}
    for c in collectives:
        spans = any(len({d // target.devices_per_node for d in g}) > 1 for g in c.groups)
        bw = target.inter_bw if spans else target.intra_bw
        n = max(c.group_size, 1)
        ring = (n - 1) / n
        factors = {"all-gather": ring, "reduce-scatter": ring, "all-to-all": ring,
                   "all-reduce": 2 * ring, "collective-permute": 1.0}
        whole = c.bytes - c.sliced_bytes
        seconds = (whole * factors[c.kind] + c.sliced_bytes * ring) / bw
        total += seconds * c.trips
        by_kind[c.kind] += c.bytes * c.trips
    return total, by_kind


_CALLED = re.compile(r"\b(body|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def pipeline_trips(hlo_text: str, collectives: Sequence[hlo.Collective],
                   table: pipeline.Timetable) -> list[hlo.Collective]:
    """`collectives` of a pipelined step with `trips` counted through every enclosing loop.

    `hlo.collectives` weighs a collective by its innermost loop's trip count. A pipelined step
    runs the layer loops inside the branches of its tick loop's switch (idle, forward,
    backward: `pipeline.IDLE`, `FORWARD`, `BACKWARD`), so a layer's collective runs
    (layer-loop trips) x (ticks that run its branch) times per step. Here a computation runs
    the sum over the instructions calling it of runs(caller) x: the trip count for a loop body;
    for branch k of a conditional in the body of a loop of `table.ticks` trips, the share of a
    stage's ticks with code k; otherwise 1.
    """
    instrs = hlo.parse(hlo_text)
    trips_of_body: dict[str, int] = {}
    for i in instrs.values():
        body, n = re.search(r"\bbody=%([\w.\-]+)", i.attrs), _TRIP_COUNT.search(i.attrs)
        if i.opcode == "while" and body and n:
            trips_of_body[body.group(1)] = int(n.group(1))
    codes = np.asarray(table.code)
    share = [float(np.mean(np.sum(codes == k, axis=0))) / table.ticks
             for k in (pipeline.IDLE, pipeline.FORWARD, pipeline.BACKWARD)]
    callers: dict[str, list[tuple[str, float]]] = {}
    for i in instrs.values():
        for key, callee in _CALLED.findall(i.attrs):
            factor = trips_of_body.get(callee, 1) if key == "body" else 1
            callers.setdefault(callee, []).append((i.computation, factor))
        m = _BRANCHES.search(i.attrs)
        if m:
            branches = [b.strip().lstrip("%") for b in m.group(1).split(",") if b.strip()]
            tick = (trips_of_body.get(i.computation) == table.ticks
                    and len(branches) <= len(share))
            for k, b in enumerate(branches):
                callers.setdefault(b, []).append((i.computation, share[k] if tick else 1))
    runs: dict[str, float] = {}

    def runs_of(comp: str, seen: frozenset = frozenset()) -> float:
        if comp not in runs:
            up = [(c, f) for c, f in callers.get(comp, []) if c not in seen]
            runs[comp] = (sum(runs_of(c, seen | {comp}) * f for c, f in up)
                          if comp in callers else 1.0)
        return runs[comp]

    return [dataclasses.replace(c, trips=round(runs_of(instrs[c.name].computation)))
            if c.name in instrs else c for c in collectives]
