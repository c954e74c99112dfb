"""Images/s and MFU of the digits presets (resnet-digits, vit-digits) on 8 simulated CPU devices,
per mesh.

Each (preset, mesh) is a jaxscale train step (`jaxscale.run.build`) compiled ahead of time and
timed round-robin with the others (each call blocked until done) on a batch of the preset's
shape read from its own data pipeline. MFU is the task's FLOPs per image (6 x the model's
forward multiply-accumulates, `jaxscale.tasks.classify.FORWARD_MACS`) times images/s over the
peak of the devices (on the CPU: a measured float32 matmul rate shared by the simulated
devices).

    python benchmarks/vision_throughput.py
    python benchmarks/vision_throughput.py --quick
"""

from __future__ import annotations

import sys

from common import median_spread, round_robin, table_benchmark_args

# preset -> mesh name -> mesh overrides
MESHES = {
    "resnet-digits": {"fsdp=8": ["mesh.fsdp=8"], "data=8": ["mesh.data=8", "mesh.fsdp=1"],
                      "data=4 x fsdp=2": ["mesh.data=4", "mesh.fsdp=2"]},
    "vit-digits": {"fsdp=8": ["mesh.fsdp=8"], "data=8": ["mesh.data=8", "mesh.fsdp=1"],
                   "fsdp=4 x tensor=2": ["mesh.fsdp=4", "mesh.tensor=2"]},
}


def main(argv=None) -> str:
    args = table_benchmark_args(argv, __doc__.split("\n")[0], "mesh")
    import jax
    from common import Step

    from jaxscale import config as config_lib
    from jaxscale.analysis import metrics

    steps = 5 if args.quick else args.steps
    runs = {}
    for preset, meshes in MESHES.items():
        for mesh, overrides in meshes.items():
            cfg = config_lib.load(preset, [*overrides, "progress=false"])
            runs[(preset, mesh)] = Step(cfg, batch_fn=_first_batch)
    times = round_robin(list(runs.values()), steps)
    peak = metrics.peak_flops_per_device()
    batch = next(iter(runs.values())).cfg.batch_size
    lines = [f"{steps} timed steps per row, round-robin; batch {batch} images, float32; peak "
             f"{peak / 1e9:.1f} GFLOP/s per simulated device (measured matmul rate / 8).", "",
             "| preset | mesh | step ms (median) | min-max | images/s | GFLOPs per image | MFU |",
             "|---|---|---|---|---|---|---|"]
    for ((preset, mesh), step), t in zip(runs.items(), times, strict=True):
        med, lo, hi = median_spread(t)
        images_per_s = step.cfg.batch_size / (med / 1e3)
        flops = step.flops_per_example
        mfu = images_per_s * flops / (jax.device_count() * peak)
        lines.append(f"| {preset} | {mesh} | {med:.1f} | {lo:.1f}-{hi:.1f} | "
                     f"{images_per_s:,.0f} | {flops / 1e9:.4f} | {100 * mfu:.1f}% |")
    table = "\n".join(lines)
    print(table)
    return table


def _first_batch(run) -> dict:
    """The preset's first training batch, from its own pipeline (augmentation included)."""
    train, _ = run.task.pipelines(run.cfg, run.batch_shardings)
    return train.local_batch(0)


if __name__ == "__main__":
    main(sys.argv[1:])
