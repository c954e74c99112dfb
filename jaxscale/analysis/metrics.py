"""FLOPs, MFU, throughput and memory; the metrics writers and the progress bar.

FLOPs per token (training: forward + backward = 3 x forward, each matmul 2 FLOPs per MAC):

    N_mm      = L * (D*N*H + 2*D*K*H + N*H*D + n_mlp*D*F) + D*V     (matmul parameters; the input
                                                                  embedding is a lookup, not a
                                                                  matmul, and is not counted)
    causal    = 6 * N_mm + 6 * L * T * N * H      (attention: QK^T and PV, 2 matmuls x 2 FLOPs x
                                                   3 passes, over the T/2 keys a causal query sees)
    noncausal = 6 * N_mm + 12 * L * T * N * H     (the "6N + 12LHQT" figure of the papers)

where L layers, D d_model, N query heads, K kv heads, H head dim, F MLP width, n_mlp 3 for
SwiGLU (2 otherwise), V vocab, T sequence length. MFU uses the causal count: the FLOPs a causal
model needs, over the devices' peak. XLA computes the full T x T attention scores, so its own cost
analysis is compared with the non-causal count.

Mixture of experts: FLOPs count the *active* parameters only, the ones a token passes through.
A MoE layer's MLP term is ``n_mlp * D * F_e * (k + shared) + D * E`` (k routed experts of width
F_e, the shared experts, and the router) in place of ``n_mlp * D * F``; the E - k experts a token
skips cost it nothing, so the MFU of a sparse model is comparable with a dense one's. Capacity
padding and dropped tokens are not counted either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.config import ModelConfig

# --------------------------------------------------------------------------------------------
# FLOPs.


@dataclasses.dataclass(frozen=True)
class Flops:
    matmul_params: int  # N_mm: parameters that take part in a token's matmuls (active ones)
    causal_per_token: float  # training FLOPs per token, causal attention
    noncausal_per_token: float  # training FLOPs per token, full attention (6N + 12LHQT)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> Flops:
    """Training FLOPs per token of the decoder described by `cfg` (see the module docstring)."""
    L, D, F, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    N = cfg.num_heads
    K, H = cfg.kv_heads, cfg.head_size
    n_mlp = 3 if cfg.mlp == "swiglu" else 2
    moe = cfg.moe
    moe_layers = L // moe.every_n_layers if moe.num_experts else 0
    dense_mlp = n_mlp * D * F
    active_moe = (n_mlp * D * (moe.d_ff or F) * (moe.top_k + moe.num_shared_experts)
                  + D * moe.num_experts)
    mlp = (L - moe_layers) * dense_mlp + moe_layers * active_moe
    matmul = L * (D * N * H + 2 * D * K * H + N * H * D) + mlp + D * V
    attention = 12 * L * seq_len * N * H
    return Flops(
        matmul_params=matmul,
        causal_per_token=6.0 * matmul + attention / 2,
        noncausal_per_token=6.0 * matmul + attention,
    )


def parameter_counts(params: Any) -> tuple[int, int]:
    """(total, non-embedding) parameters of a parameter tree (arrays or shape structs).

    Embedding parameters are the lookup tables of `flax.linen.Embed` (leaves named
    "embedding": the token table and a learned position table), as scaling laws count N
    (Kaplan et al. 2020). An untied output projection is a matmul and counts; a tied one is
    the token table and does not.
    """
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = int(np.prod(leaf.shape))
        total += size
        last = path[-1] if path else None
        if getattr(last, "key", getattr(last, "name", None)) == "embedding":
            embedding += size
    return total, total - embedding


# --------------------------------------------------------------------------------------------
# Peak FLOP/s per device.

# Dense bf16 peak FLOP/s per device (per chip for TPUs), matched against `device.device_kind`.
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
}

_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "jaxscale"
# No CPU core multiplies float32 matrices at 1 TFLOP/s (a wide-vector x86 core peaks near 0.2):
# a rate above this per core is a timing error, and is neither used nor recorded.
CPU_CEILING_PER_CORE = 1e12


def _known_peak(device_kind: str) -> float | None:
    if "H100" in device_kind and "PCIe" in device_kind:
        return 756e12
    for name, peak in PEAK_FLOPS.items():  # longest names first where they share a prefix
        if name in device_kind:
            return peak
    return None


def measure_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a float32 size^3 matmul on the first device: the best of `repeats` runs."""
    device = jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@functools.cache
def cpu_peak_flops() -> float:
    """This machine's matmul FLOP/s on the CPU with this jax: the best rate measured so far.

    Each process measures once (a fraction of a second) and keeps the larger of that and the
    best one recorded in ~/.cache/jaxscale, which it updates: a measurement taken while the
    machine was busy would understate the peak and so overstate MFU, and a newer jax's
    faster CPU backend gets its own record. A rate above `CPU_CEILING_PER_CORE` per core,
    measured or recorded, is a timing error: it is dropped (else one such reading would become
    the peak for good and every MFU near 0%).
    """
    key = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}-jax{jax.__version__}"
    cache = _CACHE / "cpu_peak.json"
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    ceiling = CPU_CEILING_PER_CORE * (os.cpu_count() or 1)

    def plausible(rate: float) -> float:
        return rate if rate <= ceiling else 0.0

    best = plausible(float(cached.get(key, 0.0)))
    peak = max(plausible(measure_matmul_flops()), best)
    if peak > best:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({**cached, key: peak}))
            tmp.replace(cache)
        except OSError:
            pass
    return peak


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: the table for accelerators, a measured matmul on the CPU.

    Simulated CPU devices share the machine's cores, so each gets the machine's peak divided by
    the number of local devices.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_peak_flops() / max(jax.local_device_count(), 1)
    peak = _known_peak(device.device_kind)
    if peak is None:
        print(
            f"jaxscale: unknown peak FLOP/s for device kind {device.device_kind!r}; MFU is "
            "reported against the measured float32 matmul rate", file=sys.stderr,
        )
        return measure_matmul_flops(4096)
    return peak


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return tokens_per_sec * flops_per_token / (num_devices * peak)


# --------------------------------------------------------------------------------------------
# Compiled-step analysis.


@dataclasses.dataclass(frozen=True)
class CompiledStats:
    flops: float | None  # XLA's FLOP count for one call of the step, per device
    argument_bytes: int  # per device: inputs (state + batch)
    output_bytes: int  # per device: outputs
    temp_bytes: int  # per device: activations and other temporaries
    alias_bytes: int  # per device: outputs that reuse donated inputs
    peak_bytes: int  # per device: arguments + outputs + temporaries - aliased


def compiled_stats(compiled: Any) -> CompiledStats:
    """FLOPs and per-device memory of a compiled (AOT) function."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0)) if cost else None
    mem = compiled.memory_analysis()
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    return CompiledStats(flops, arg, out, temp, alias, arg + out + temp - alias)


# --------------------------------------------------------------------------------------------
# Writers.


class JsonlWriter:
    """Appends one JSON object per line and flushes it. A line cut short by a crash is the last
    line and is not valid JSON, so readers detect it (`read_jsonl` skips it).

    Args:
      path: the file.
      keep_through: records of an earlier run with a step above this are dropped first (a run
        resumed from a checkpoint at this step repeats them; 0 starts a fresh file). The file is
        rewritten atomically.
    """

    def __init__(self, path: str | os.PathLike, keep_through: int = 0):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in (read_jsonl(self.path) if self.path.exists() else [])
                if isinstance(r.get("step"), int) and r["step"] <= keep_through]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(_plain(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file, skipping a trailing line that a crash cut short."""
    out = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, (np.generic, np.ndarray)):
            v = v.item()
        if isinstance(v, float) and not np.isfinite(v):
            v = str(v)  # JSON has no NaN/inf; keep them readable
        out[k] = v
    return out


class TensorBoardWriter:
    """Scalars to TensorBoard event files in `<workdir>/tensorboard` (tensorboardX)."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), flush_secs=10)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float, np.generic)) and not isinstance(v, bool):
                self._writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Fans metrics out to the JSONL file, TensorBoard and the progress bar (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._writers: list[Any] = []
        self._bar = None
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        self._writers = [JsonlWriter(workdir / "metrics.jsonl", keep_through=start_step),
                         TensorBoardWriter(workdir / "tensorboard")]
        if progress and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_step = start_step

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        for w in self._writers:
            w.write(record)
        if self._bar is not None:
            step = int(record["step"])
            self._bar.update(step - self._last_step)
            self._last_step = step
            shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_sec", "mfu")
                     if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def log(self, message: str) -> None:
        """A line for the user, printed above the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for w in self._writers:
            w.close()
