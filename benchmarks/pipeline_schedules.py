"""Pipeline schedules against FSDP on 8 simulated CPU devices.

One table, measured in one process with its rows timed round-robin (every call blocked until
done): the tiny preset with 8 layers, float32, the same model and global batch on every row:

* fsdp: fsdp=8, no pipeline (the reference);
* gpipe: stage=4 x data=2, all forwards then all backwards (autodiff), 8 microbatches;
* circular: stage=4 x data=2, 2 virtual stages per stage interleaved, 8 microbatches;
* 1f1b: stage=4 x data=2, the hand-scheduled loop, 8 and 16 microbatches;
* 1f1b, stage=2 x fsdp=4: two stages, each sharded over 4 devices, 8 microbatches.

Bubble, in-flight chunk inputs and stage-to-stage bytes come from the schedule's timetable
(`jaxscale.analysis.inspection.pipeline_report`); collective-permute bytes per step from the
partitioned HLO (loop bodies weighed by their trip counts); the train state from the sharding
report; temps and peak from XLA's memory analysis.

    python benchmarks/pipeline_schedules.py
    python benchmarks/pipeline_schedules.py --quick
"""

from __future__ import annotations

import sys

from common import median_spread, mib, round_robin, table_benchmark_args

PIPE = ["mesh.fsdp=1", "mesh.stage=4", "mesh.data=2"]
ROWS = {
    "fsdp": ["mesh.fsdp=8"],
    "gpipe": [*PIPE, "pipeline.schedule=gpipe", "pipeline.microbatches=8"],
    "circular": [*PIPE, "pipeline.schedule=circular", "pipeline.virtual_stages=2",
                 "pipeline.microbatches=8"],
    "1f1b": [*PIPE, "pipeline.schedule=1f1b", "pipeline.microbatches=8"],
    "1f1b, M=16": [*PIPE, "pipeline.schedule=1f1b", "pipeline.microbatches=16"],
    "1f1b, stage=2 x fsdp=4": ["mesh.fsdp=4", "mesh.stage=2", "pipeline.schedule=1f1b",
                               "pipeline.microbatches=8"],
}
QUICK_ROWS = ("fsdp", "1f1b")
HEADER = ("| row | mesh | schedule | M | V | step ms (median) | min-max | time vs fsdp | "
          "bubble (table) | bubble (S-1)/(V*M+S-1) | in flight | stage-to-stage MiB/device | "
          "collective-permute MiB (HLO) | temps MiB/device | peak MiB/device | "
          "state MiB/device |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _mesh(step) -> str:
    return " x ".join(f"{k}={v}" for k, v in step.run.mesh.shape.items() if v > 1)


def _table(runs: dict, steps: int) -> list[str]:
    from jaxscale.analysis import inspection

    times = dict(zip(runs, round_robin(list(runs.values()), steps), strict=True))
    ref = median_spread(times["fsdp"])[0]
    lines = [HEADER]
    for name, step in runs.items():
        med, lo, hi = median_spread(times[name])
        p = inspection.pipeline_report(step.run)
        state = sum(r.bytes_per_device for r in step.rows)
        if p is None:
            sched = "| - | - | - |"
            bubble = "| - | - | - | - |"
        else:
            sched = f"| {p.schedule} | {p.microbatches} | {p.virtual_stages} |"
            bubble = (f"| {p.bubble_fraction:.1%} | {p.bubble_formula:.1%} | {p.in_flight} | "
                      f"{mib(p.stage_bytes)} |")
        lines.append(
            f"| {name} | {_mesh(step)} {sched} {med:.1f} | {lo:.1f}-{hi:.1f} | "
            f"{med / ref:.2f}x {bubble} {mib(step.collectives['collective-permute'].bytes)} | "
            f"{mib(step.stats.temp_bytes)} | {mib(step.stats.peak_bytes)} | {mib(state)} |")
    return lines


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "row")
    from common import Step

    from jaxscale import config as config_lib

    steps = min(args.steps, 5) if args.quick else args.steps
    size = (["model.d_model=32", "model.d_ff=64", "batch_size=16", "seq_len=32"] if args.quick
            else ["batch_size=32", "seq_len=128"])
    base = ["model.num_layers=8", *size, "model.dtype=float32", "model.param_dtype=float32",
            "optim.warmup_steps=0", "data.source=synthetic"]
    names = QUICK_ROWS if args.quick else tuple(ROWS)
    runs = {name: Step(config_lib.load("tiny", [*base, *ROWS[name]])) for name in names}
    cfg = runs["fsdp"].cfg
    m = cfg.model
    lines = [f"Model: {m.num_layers} layers x {m.d_model} (MLP {m.d_ff}), batch "
             f"{cfg.batch_size} x {cfg.seq_len}, float32; {steps} steps per row, round-robin.",
             "", *_table(runs, steps)]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
