"""Input pipeline vs train step: how much faster the data path delivers batches than the step eats.

For each data source (text read and tokenized in memory, `jaxscale prepare` shards memory-mapped
from disk, synthetic tokens) this measures, in one run on the same devices:

  pipeline   global batches per second out of `DataIterator` (grain threads read and pack the
             rows, `jax.make_array_from_process_local_data` assembles the sharded global arrays,
             each batch blocked until it is on the devices)
  step       train steps per second of the preset's compiled step on a fixed batch
  ratio      pipeline / step: how many times faster the data arrives than it is consumed
  wait       during a real loop of steps fed by the iterator, the fraction of wall time the loop
             spent waiting in `next()` for a batch

    python benchmarks/data_throughput.py                    # tiny preset, 8 simulated CPU devices
    python benchmarks/data_throughput.py --devices 0        # the machine's own devices (GPU)
    python benchmarks/data_throughput.py batch_size=64      # any config override

Prints a table and writes it as JSON lines with --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="preset or YAML (default: tiny)")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices (0 = the machine's own devices)")
    p.add_argument("--sources", default="text,shards,synthetic", help="comma-separated")
    p.add_argument("--batches", type=int, default=200, help="batches timed per source")
    p.add_argument("--steps", type=int, default=20, help="train steps timed")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--out", default=None, help="append the results as JSON lines here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from jaxscale import config as config_lib
    from jaxscale.run.devices import set_cpu_devices

    base = config_lib.load(args.config, args.overrides)
    if args.devices:
        set_cpu_devices(args.devices)

    import jax

    from jaxscale.data.prepare import prepare
    from jaxscale.run.build import build

    run = build(base)
    tmp = tempfile.TemporaryDirectory(prefix="jaxscale-bench-")

    def config_for(source: str):
        if source == "shards":
            out = pathlib.Path(tmp.name) / "shards"
            start = time.perf_counter()
            manifest = prepare(base.data.path, str(out), tokenizer=base.data.tokenizer,
                               shard_mb=4, progress=False)
            print(f"prepared {manifest['num_tokens']:,} tokens in {manifest['num_shards']} shards "
                  f"in {time.perf_counter() - start:.1f}s", flush=True)
            return config_lib.replace(base, **{"data.source": "shards", "data.path": str(out)})
        return config_lib.replace(base, **{"data.source": source})

    def timed(fn, repeats: int) -> float:
        return statistics.median(fn() for _ in range(repeats))

    def pipeline_for(cfg):
        """The run's training pipeline of `cfg`'s data settings (the task's own pipelines)."""
        return run.task.pipelines(cfg, run.batch_shardings)[0]

    # The train step, on a fixed batch (no data in the timing).
    state = run.init_state()
    rng = jax.random.key(0)
    fixed = pipeline_for(config_for("synthetic")).batch(0)
    compiled = run.lower(state, fixed, rng).compile()
    for _ in range(3):
        state, metrics = compiled(state, fixed, rng)
    jax.block_until_ready(metrics)

    def step_window() -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, fixed, rng)
        jax.block_until_ready(metrics)
        return args.steps / (time.perf_counter() - start)

    steps_per_s = timed(step_window, args.repeats)
    print(f"train step: {steps_per_s:.2f} steps/s ({1e3 / steps_per_s:.1f} ms/step), "
          f"batch {base.batch_size} x {base.seq_len} on {jax.device_count()} devices", flush=True)

    rows = []
    for source in args.sources.split(","):
        cfg = config_for(source)
        start = time.perf_counter()
        pipeline = pipeline_for(cfg)
        setup_s = time.perf_counter() - start
        it = pipeline.iterator(0)
        for _ in range(5):
            jax.block_until_ready(next(it))

        def data_window(it=it) -> float:
            start = time.perf_counter()
            for _ in range(args.batches):
                jax.block_until_ready(next(it))
            return args.batches / (time.perf_counter() - start)

        batches_per_s = timed(data_window, args.repeats)

        # A loop as trainer.py runs it: dispatch the step, then take the next batch.
        waited, start = 0.0, time.perf_counter()
        batch = next(it)
        for _ in range(args.steps):
            state, metrics = compiled(state, batch, rng)
            t = time.perf_counter()
            batch = next(it)
            waited += time.perf_counter() - t
        jax.block_until_ready(metrics)
        wait_fraction = waited / (time.perf_counter() - start)
        it.close()

        row = {
            "source": source, "config": args.config, "devices": jax.device_count(),
            "batch": base.batch_size, "seq_len": base.seq_len, "setup_s": round(setup_s, 2),
            "batches_per_s": round(batches_per_s, 1), "steps_per_s": round(steps_per_s, 2),
            "ratio": round(batches_per_s / steps_per_s, 1),
            "loop_wait_fraction": round(wait_fraction, 4),
            "num_threads": cfg.data.num_threads, "prefetch": cfg.data.prefetch,
        }
        rows.append(row)
        print(f"{source:>9}: {batches_per_s:8.1f} batches/s = {row['ratio']:6.1f}x the step; "
              f"loop waited {100 * wait_fraction:.2f}% of the time (setup {setup_s:.1f}s)",
              flush=True)

    print("\n| source | batches/s | steps/s | ratio | loop waiting on data |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['batches_per_s']} | {r['steps_per_s']} | {r['ratio']}x | "
              f"{100 * r['loop_wait_fraction']:.2f}% |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    tmp.cleanup()
    if min(r["ratio"] for r in rows) < 10:
        print("WARNING: the input pipeline is less than 10x faster than the step", file=sys.stderr)


if __name__ == "__main__":
    main()
