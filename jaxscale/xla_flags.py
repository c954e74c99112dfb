"""XLA flags the launcher sets for GPU runs: overlap collectives with compute.

`apply_gpu_flags()` runs in the CLI before jax is imported (XLA reads `XLA_FLAGS` once, when its
backend starts). It adds each flag of `GPU_FLAGS` to `XLA_FLAGS` unless the user already set that
flag (the user's value always wins), and does nothing for CPU runs (`--cpu-devices`, or
`JAX_PLATFORMS` naming only cpu/tpu). XLA ignores `--xla_gpu_*` flags on other backends, but an
unknown flag aborts the process, so every flag here is one that the supported jaxlib versions
parse (tests/test_xla_flags.py starts a process with all of them).

- `xla_gpu_enable_latency_hiding_scheduler=true`: schedule collectives early and compute while
  they run (asynchronous collectives on their own stream).
- `xla_gpu_enable_pipelined_all_gather=true`: FSDP: gather layer i+1's weights inside the layer
  loop while layer i computes.
- `xla_gpu_enable_pipelined_reduce_scatter=true`: FSDP: reduce-scatter layer i's gradients while
  the next layer's backward pass runs.
- `xla_gpu_enable_pipelined_all_reduce=true`: DP: the same for all-reduced gradients.
- `xla_gpu_enable_while_loop_double_buffering=true`: unroll the scanned layer loop by two, so the
  pipelined collectives have a slot to overlap with.
- `xla_gpu_{all_gather,reduce_scatter,all_reduce}_combine_threshold_bytes=128MiB`: fewer, larger
  collectives (better bandwidth, fewer launches).

On one GPU (no collectives) the flags change nothing measurable; benchmarks/RESULTS.md has the
A/B of the single-GPU benchmark with and without them.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

_COMBINE_BYTES = 128 * 1024 * 1024

GPU_FLAGS: dict[str, str] = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(_COMBINE_BYTES),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(_COMBINE_BYTES),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(_COMBINE_BYTES),
}


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def gpu_flags_wanted(environ: MutableMapping[str, str] | None = None) -> bool:
    """False when the run is pinned to non-GPU platforms (JAX_PLATFORMS=cpu, tpu, ...)."""
    environ = os.environ if environ is None else environ
    platforms = {p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    return not platforms or bool(platforms & {"cuda", "gpu", "rocm"})


def apply_gpu_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Add the `GPU_FLAGS` the user has not set to XLA_FLAGS; returns the flags added.

    Must run before jax initialises a backend. A no-op (returns []) when `gpu_flags_wanted` is
    False or when JAXSCALE_NO_XLA_FLAGS=1.
    """
    environ = os.environ if environ is None else environ
    if environ.get("JAXSCALE_NO_XLA_FLAGS") == "1" or not gpu_flags_wanted(environ):
        return []
    existing = environ.get("XLA_FLAGS", "").split()
    have = {_flag_name(f) for f in existing}
    added = [f"--{name}={value}" for name, value in GPU_FLAGS.items() if name not in have]
    if added:
        environ["XLA_FLAGS"] = " ".join(existing + added)
    return added
