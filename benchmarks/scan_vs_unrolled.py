"""Scanned vs unrolled layers at 4, 16 and 32 layers: compile time and step time.

`model.scan_layers=true` compiles one layer body inside a loop; `false` unrolls every layer into
the program; `model.scan_unroll=2` runs two layers per iteration of the loop. Same model
otherwise, fsdp over 8 simulated CPU devices; the three versions of each depth are timed
alternately (each call blocked until done).

    python benchmarks/scan_vs_unrolled.py
    python benchmarks/scan_vs_unrolled.py --quick --layers 4 16
"""

from __future__ import annotations

import argparse
import gc
import sys

from common import median_spread, round_robin, simulate_devices


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--steps", type=int, default=10, help="timed steps per version")
    p.add_argument("--quick", action="store_true", help="5 steps")
    args = p.parse_args(argv)
    simulate_devices(8)
    from common import Step

    from jaxscale import config as config_lib

    steps = 5 if args.quick else args.steps
    base = ["model.d_model=64", "model.num_heads=4", "model.num_kv_heads=4", "model.d_ff=256",
            "batch_size=16", "seq_len=64", "mesh.fsdp=8", "optim.warmup_steps=0"]
    lines = [f"Model: d_model 64 (MLP 256), batch 16 x 64, fsdp=8; {steps} steps per version, "
             "alternating.", "",
             "| layers | compile s (scan) | compile s (unrolled) | compile unrolled/scan | "
             "step ms scan (min-max) | step ms unrolled (min-max) | step unrolled/scan | "
             "compile s (scan_unroll=2) | step ms scan_unroll=2 (min-max) | "
             "step scan_unroll=2/scan |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    forms = (["model.scan_layers=true"], ["model.scan_layers=false"],
             ["model.scan_layers=true", "model.scan_unroll=2"])
    for layers in args.layers:
        trio = [Step(config_lib.load("tiny", [*base, f"model.num_layers={layers}", *form]))
                for form in forms]
        times = round_robin(trio, steps)
        (s_med, s_lo, s_hi), (u_med, u_lo, u_hi), (r_med, r_lo, r_hi) = (
            median_spread(t) for t in times)
        scan, unrolled, unroll2 = trio
        lines.append(
            f"| {layers} | {scan.compile_s:.1f} | {unrolled.compile_s:.1f} | "
            f"{unrolled.compile_s / scan.compile_s:.1f}x | {s_med:.1f} ({s_lo:.1f}-{s_hi:.1f}) "
            f"| {u_med:.1f} ({u_lo:.1f}-{u_hi:.1f}) | {u_med / s_med:.2f}x | "
            f"{unroll2.compile_s:.1f} | {r_med:.1f} ({r_lo:.1f}-{r_hi:.1f}) | "
            f"{r_med / s_med:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout
        del trio, scan, unrolled, unroll2
        gc.collect()
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
