"""Expert and context parallelism against FSDP on 8 simulated CPU devices.

Two tables, each measured in one process with its rows timed round-robin (every call blocked
until done):

* experts: the tiny-moe preset (8 experts, top-2, dropless) on fsdp=8, expert=4 x fsdp=2,
  expert=2 x fsdp=2 x tensor=2 and with the capacity dispatch, next to the dense tiny preset
  on fsdp=8 (same FLOPs per token);
* long context: the tiny preset at a long sequence on fsdp=8 (whole sequences per device),
  sequence=8 and sequence=4 x fsdp=2 with the load-balanced ring, sequence=4 x fsdp=2 with
  all-gathered K/V, and sequence=8 left to the partitioner (context_parallel=none).

Bytes per device: the train state from the sharding report, activations/temps and peak from
XLA's memory analysis, collective bytes per step from the partitioned HLO.

    python benchmarks/sparse_and_long.py
    python benchmarks/sparse_and_long.py --quick
"""

from __future__ import annotations

import sys

from common import median_spread, mib, round_robin, table_benchmark_args

EXPERTS = {
    "dense tiny, fsdp": ("tiny", ["mesh.fsdp=8"]),
    "fsdp": ("tiny-moe", ["mesh.fsdp=8"]),
    "expert x fsdp": ("tiny-moe", ["mesh.fsdp=2", "mesh.expert=4"]),
    "expert x fsdp x tensor": ("tiny-moe", ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]),
    "expert x fsdp, capacity 1.25": ("tiny-moe", ["mesh.fsdp=2", "mesh.expert=4",
                                                  "model.moe.dispatch=capacity"]),
}
LONG = {
    "fsdp": ["mesh.fsdp=8"],
    "ring, sequence": ["mesh.fsdp=1", "mesh.sequence=8", "model.context_parallel=ring"],
    "ring, sequence x fsdp": ["mesh.fsdp=2", "mesh.sequence=4", "model.context_parallel=ring"],
    "allgather, sequence x fsdp": ["mesh.fsdp=2", "mesh.sequence=4",
                                   "model.context_parallel=allgather"],
    "partitioner, sequence": ["mesh.fsdp=1", "mesh.sequence=8"],
}
HEADER = ("| strategy | model | mesh | step ms (median) | min-max | time vs fsdp | "
          "state MiB/device | temps MiB/device | peak MiB/device | all-gather MiB | "
          "all-to-all MiB | collective-permute MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _mesh(overrides: list[str]) -> str:
    return " x ".join(o.split(".")[1] for o in overrides
                      if o.startswith("mesh.") and not o.endswith("=1"))


def _table(runs: dict, models: dict, steps: int, reference: str) -> list[str]:
    times = dict(zip(runs, round_robin(list(runs.values()), steps), strict=True))
    ref = median_spread(times[reference])[0]
    lines = [HEADER]
    for name, step in runs.items():
        med, lo, hi = median_spread(times[name])
        model, overrides = models[name]
        c = step.collectives
        state = sum(r.bytes_per_device for r in step.rows)
        lines.append(
            f"| {name} | {model} | {_mesh(overrides)} | {med:.1f} | {lo:.1f}-{hi:.1f} | "
            f"{med / ref:.2f}x | {mib(state)} | {mib(step.stats.temp_bytes)} | "
            f"{mib(step.stats.peak_bytes)} | {mib(c['all-gather'].bytes)} | "
            f"{mib(c['all-to-all'].bytes)} | {mib(c['collective-permute'].bytes)} |")
    return lines


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "strategy")
    from common import Step

    from jaxscale import config as config_lib

    steps = min(args.steps, 5) if args.quick else args.steps
    small = (["model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.moe.d_ff=32"]
             if args.quick else [])
    moe_base = [*small, "batch_size=16", "seq_len=128", "data.source=synthetic"]
    dense_base = [o for o in moe_base if "moe" not in o]
    runs = {name: Step(config_lib.load(preset, [*(moe_base if preset == "tiny-moe"
                                                   else dense_base), *extra]))
            for name, (preset, extra) in EXPERTS.items()}
    cfg = runs["fsdp"].cfg
    lines = [f"Experts: {cfg.model.num_layers} layers x {cfg.model.d_model}, "
             f"{cfg.model.moe.num_experts} experts of {cfg.model.moe.d_ff} (top-"
             f"{cfg.model.moe.top_k}) vs the dense MLP of {cfg.model.d_ff}; batch "
             f"{cfg.batch_size} x {cfg.seq_len}, float32, {steps} steps per row.", "",
             *_table(runs, EXPERTS, steps, "fsdp")]
    del runs

    seq = 256 if args.quick else 2048
    long_base = [*small[:3], "batch_size=8", f"seq_len={seq}", f"model.max_seq_len={seq}",
                 "data.source=synthetic", "model.attention=xla"]
    models = {name: ("tiny", extra) for name, extra in LONG.items()}
    runs = {name: Step(config_lib.load("tiny", [*long_base, *extra]))
            for name, extra in LONG.items()}
    cfg = runs["fsdp"].cfg
    lines += ["", f"Long context: {cfg.model.num_layers} layers x {cfg.model.d_model}, batch "
              f"{cfg.batch_size} x {cfg.seq_len}, float32, {steps} steps per row.", "",
              *_table(runs, models, steps, "fsdp")]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
