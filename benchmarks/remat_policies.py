"""Step time and activation memory of every remat policy on one model (8 simulated CPU devices).

Each policy's step is compiled ahead of time (temporaries = activations, from XLA's memory
analysis) and timed round-robin with the others, each call blocked until done. Prints a markdown
table: median step time with its spread, time and activation memory relative to no remat.

    python benchmarks/remat_policies.py            # 4 layers x 256 wide, seq 256, fsdp=8
    python benchmarks/remat_policies.py --quick
"""

from __future__ import annotations

import sys

from common import median_spread, mib, round_robin, table_benchmark_args, table_model_overrides


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "policy")
    from common import Step

    from jaxscale import config as config_lib
    from jaxscale.core import remat
    from jaxscale.errors import ConfigError

    steps = 5 if args.quick else args.steps
    base = [*table_model_overrides(args.quick), "mesh.fsdp=8"]

    runs, skipped = {}, []
    for policy in remat.POLICIES:
        try:
            remat.get_policy(policy)
        except ConfigError as e:  # e.g. offloading without pinned host memory on this backend
            skipped.append(f"{policy}: {e}")
            continue
        runs[policy] = Step(config_lib.load("tiny", [*base, f"model.remat={policy}"]))
    times = round_robin(list(runs.values()), steps)
    ref_ms = median_spread(times[list(runs).index("none")])[0]
    ref_mem = runs["none"].stats.temp_bytes
    cfg = runs["none"].cfg
    lines = [f"Model: {cfg.model.num_layers} layers x {cfg.model.d_model} (MLP "
             f"{cfg.model.d_ff}), batch {cfg.batch_size} x {cfg.seq_len}, fsdp=8; {steps} "
             "steps per policy, round-robin.", "",
             "| policy | step ms (median) | min-max | time vs none | activations+temps MiB "
             "| memory vs none | compile s |", "|---|---|---|---|---|---|---|"]
    for (name, step), t in zip(runs.items(), times, strict=True):
        med, lo, hi = median_spread(t)
        lines.append(f"| {name} | {med:.1f} | {lo:.1f}-{hi:.1f} | {med / ref_ms:.2f}x | "
                     f"{mib(step.stats.temp_bytes)} | {step.stats.temp_bytes / ref_mem:.2f}x | "
                     f"{step.compile_s:.1f} |")
    lines += [f"\nNot measured: {s}" for s in skipped]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
