"""Scanned vs unrolled layers at 4, 16 and 32 layers: compile time and step time.

`model.scan_layers=true` compiles one layer body inside a loop; `false` unrolls every layer into
the program. Same model otherwise, fsdp over 8 simulated CPU devices; the two versions of each
depth are timed alternately (each call blocked until done).

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
             "step ms scan (min-max) | step ms unrolled (min-max) | step unrolled/scan |",
             "|---|---|---|---|---|---|---|"]
    for layers in args.layers:
        pair = [Step(config_lib.load("tiny", [*base, f"model.num_layers={layers}",
                                              f"model.scan_layers={scan}"]))
                for scan in ("true", "false")]
        times = round_robin(pair, steps)
        (s_med, s_lo, s_hi), (u_med, u_lo, u_hi) = (median_spread(t) for t in times)
        lines.append(
            f"| {layers} | {pair[0].compile_s:.1f} | {pair[1].compile_s:.1f} | "
            f"{pair[1].compile_s / pair[0].compile_s:.1f}x | {s_med:.1f} ({s_lo:.1f}-{s_hi:.1f}) "
            f"| {u_med:.1f} ({u_lo:.1f}-{u_hi:.1f}) | {u_med / s_med:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout
        del pair
        gc.collect()
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
