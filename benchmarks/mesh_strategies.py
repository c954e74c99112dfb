"""dp / fsdp / fsdp_tp / tp on 8 simulated CPU devices: step time and bytes per device.

One model, four layouts of the same 8 devices, each compiled ahead of time and timed
round-robin (each call blocked until done). Bytes per device: the train state from the sharding
report, activations/temps and peak from XLA's memory analysis, and the collective bytes per step
of the partitioned HLO.

    python benchmarks/mesh_strategies.py
    python benchmarks/mesh_strategies.py --quick
"""

from __future__ import annotations

import sys

from common import median_spread, mib, round_robin, table_benchmark_args, table_model_overrides

STRATEGIES = {
    "dp": ["mesh.data=8", "mesh.fsdp=1", "sharding.rules=dp"],
    "fsdp": ["mesh.fsdp=8", "sharding.rules=fsdp"],
    "fsdp_tp": ["mesh.fsdp=4", "mesh.tensor=2", "sharding.rules=fsdp_tp"],
    "tp": ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4", "sharding.rules=tp"],
}


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "strategy")
    from common import Step

    from jaxscale import config as config_lib

    steps = 5 if args.quick else args.steps
    base = table_model_overrides(args.quick)
    runs = {name: Step(config_lib.load("tiny", [*base, *extra]))
            for name, extra in STRATEGIES.items()}
    times = round_robin(list(runs.values()), steps)
    ref = median_spread(times[0])[0]
    cfg = runs["dp"].cfg
    lines = [f"Model: {cfg.model.num_layers} layers x {cfg.model.d_model} (MLP "
             f"{cfg.model.d_ff}), batch {cfg.batch_size} x {cfg.seq_len}, float32; {steps} steps "
             "per strategy, round-robin.", "",
             "| strategy | mesh | step ms (median) | min-max | time vs dp | state MiB/device | "
             "temps MiB/device | peak MiB/device | all-gather MiB | all-reduce MiB "
             "(of it sliced) | other collectives MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, step), t in zip(runs.items(), times, strict=True):
        med, lo, hi = median_spread(t)
        mesh = " x ".join(o.split(".")[1] for o in STRATEGIES[name] if o.startswith("mesh.")
                          and not o.endswith("=1"))
        c = step.collectives
        sliced = sum(x.sliced_bytes * x.trips for x in _collectives(step))
        other = sum(c[k].bytes for k in ("reduce-scatter", "all-to-all", "collective-permute"))
        state = sum(r.bytes_per_device for r in step.rows)
        lines.append(
            f"| {name} | {mesh} | {med:.1f} | {lo:.1f}-{hi:.1f} | {med / ref:.2f}x | "
            f"{mib(state)} | {mib(step.stats.temp_bytes)} | {mib(step.stats.peak_bytes)} | "
            f"{mib(c['all-gather'].bytes)} | {mib(c['all-reduce'].bytes)} ({mib(sliced)}) | "
            f"{mib(other)} |")
    table = "\n".join(lines)
    print(table)
    return table


def _collectives(step):
    from jaxscale.analysis import hlo

    return hlo.collectives(step.compiled.as_text(), 8)


if __name__ == "__main__":
    main(sys.argv[1:])
