"""The chunked cross-entropy against the whole-vocabulary one: step time, peak memory and
all-gather bytes per device on a large-vocabulary model (8 simulated CPU devices, fsdp=8).

Both steps are compiled ahead of time and timed alternately (each call blocked until done).

    python benchmarks/chunked_loss.py                # 4 layers x 256, vocab 16384, batch 8 x 256
    python benchmarks/chunked_loss.py --quick        # vocab 2048, batch 8 x 64, 5 steps
"""

from __future__ import annotations

import sys

from common import median_spread, mib, round_robin, table_benchmark_args


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "loss")
    from common import Step

    from jaxscale import config as config_lib

    steps = 5 if args.quick else args.steps
    vocab, seq = (2048, 64) if args.quick else (16384, 256)
    base = ["model.num_layers=4", "model.d_model=256", "model.num_heads=4", "model.num_kv_heads=4",
            "model.d_ff=1024", f"model.vocab_size={vocab}", f"model.max_seq_len={seq}",
            f"seq_len={seq}", "batch_size=8", "mesh.fsdp=8", "loss.chunk=64",
            "optim.warmup_steps=0"]
    runs = {c: Step(config_lib.load("tiny", [*base, f"loss.chunked={c}"]))
            for c in ("never", "always")}
    times = round_robin(list(runs.values()), steps)
    ref_ms = median_spread(times[0])[0]
    ref_peak = runs["never"].stats.peak_bytes
    lines = [f"Model: 4 layers x 256 (MLP 1024), vocabulary {vocab:,}, batch 8 x {seq}, fsdp=8, "
             f"float32; chunks of 64 positions; {steps} steps per version, alternating.", "",
             "| loss | step ms (min-max) | time vs whole | peak MiB/device | peak vs whole | "
             "all-gather MiB/step |", "|---|---|---|---|---|---|"]
    for (name, step), t in zip(runs.items(), times, strict=True):
        med, lo, hi = median_spread(t)
        peak = step.stats.peak_bytes
        lines.append(f"| {'chunked' if name == 'always' else 'whole vocabulary'} | {med:.1f} "
                     f"({lo:.1f}-{hi:.1f}) | {med / ref_ms:.3f} | {mib(peak)} | "
                     f"{peak / ref_peak:.3f} | {mib(step.collectives['all-gather'].bytes)} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
