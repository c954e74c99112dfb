"""Shared pieces of the CPU benchmarks: simulated devices, a jaxscale step of a config (through
the one run builder, `jaxscale.run.build`), random LM batches and timing several programs
round-robin.

On simulated CPU devices two programs with collectives must never be in flight at once (XLA's CPU
collectives deadlock), so every timed call blocks on its outputs before the next one starts.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence


def simulate_devices(count: int = 8) -> None:
    """N simulated CPU devices; call before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("simulate_devices must run before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def table_benchmark_args(argv, description: str, what: str):
    """Arguments shared by the table benchmarks: --steps and --quick; simulates 8 devices."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=10, help=f"timed steps per {what}")
    p.add_argument("--quick", action="store_true", help="smaller model, 5 steps")
    args = p.parse_args(argv)
    simulate_devices(8)
    return args


def table_model_overrides(quick: bool) -> list[str]:
    """The 4-layer float32 model the table benchmarks share (smaller with --quick)."""
    size = (["model.d_model=128", "model.d_ff=512", "seq_len=128"] if quick else
            ["model.d_model=256", "model.d_ff=1024", "seq_len=256"])
    return ["model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4", "batch_size=16",
            "model.max_seq_len=256", "optim.warmup_steps=0", *size]


def random_batch(run, seed: int = 0) -> dict:
    """A host batch of random tokens for `run`'s LM task, one document per row (positions
    0..T-1, one segment id, every target counted), holding exactly the fields of the run's
    batch spec; place it with ``jax.device_put(batch, run.batch_shardings)``."""
    import numpy as np

    from jaxscale.data.sources import window_records

    cfg = run.cfg
    tokens = np.random.default_rng(seed).integers(
        0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    fields = window_records(tokens, np.zeros_like(tokens))
    return {k: fields[k] for k in run.batch_spec}


class Step:
    """A jaxscale train step of one config (`jaxscale.run.build`), compiled ahead of time, with
    its state and a batch: `batch_fn(run)`'s (default: `random_batch`, tokens for an LM)."""

    def __init__(self, cfg, batch_fn: Callable | None = None):
        import jax

        from jaxscale.analysis import hlo, metrics
        from jaxscale.core import sharding as shd
        from jaxscale.run.build import build

        self.cfg = cfg
        self.run = run = build(cfg)
        self.state = run.init_state()
        self.batch = jax.device_put((batch_fn or random_batch)(run), run.batch_shardings)
        self.rng = jax.random.key(0)
        start = time.perf_counter()
        self.compiled = run.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - start
        self.stats = metrics.compiled_stats(self.compiled)
        self.rows = shd.sharding_report(run.abstract, run.mesh, run.rules)
        self.collectives = hlo.summarize(hlo.collectives(self.compiled.as_text(),
                                                         run.mesh.devices.size))
        self.flops_per_example = run.flops_per_example()  # the task's formula, or None

    def __call__(self) -> float:
        """One step, blocked until done; returns the loss (a host read after the block)."""
        import jax

        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        return metrics["loss"]

    @property
    def tokens(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len


def round_robin(fns: Sequence[Callable[[], object]], steps: int, warmup: int = 2
                ) -> list[list[float]]:
    """Seconds per call of each fn: warm each up, then call them in turn `steps` times."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return times


def median_spread(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) in milliseconds."""
    return 1e3 * statistics.median(times), 1e3 * min(times), 1e3 * max(times)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"
