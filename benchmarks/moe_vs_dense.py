"""The sparse-model claim, measured: tiny-moe vs the dense tiny at equal FLOPs per token.

Both presets train for the same steps on the same text (the Python standard library's sources,
byte tokens, the same seed and data order) on 8 simulated CPU devices (fsdp=8), and are
evaluated on the same held-out batches. tiny-moe's experts are half as wide as tiny's MLP and
each token uses 2 of its 8, so a token costs the same MLP FLOPs in both while tiny-moe holds 4x
the MLP parameters.

    python benchmarks/moe_vs_dense.py                 # 300 steps each (the presets' own)
    python benchmarks/moe_vs_dense.py --steps 50      # shorter
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

from common import simulate_devices


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="key=value settings for both runs")
    args = p.parse_args(argv)
    simulate_devices(8)

    import jax

    from jaxscale import config as config_lib
    from jaxscale.analysis.metrics import flops_per_token
    from jaxscale.run.loop import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("tiny", "tiny-moe"):
            cfg = config_lib.load(preset, [
                f"steps={args.steps}", f"eval_every={args.steps}",
                f"eval_batches={args.eval_batches}", "mesh.fsdp=8", "checkpoint.every=0",
                f"workdir={tmp}/{preset}", "progress=false", *args.overrides])
            state = train(cfg)
            params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
            summary = json.loads((pathlib.Path(cfg.workdir) / "summary.json").read_text())
            flops = flops_per_token(cfg.model, cfg.seq_len)
            rows.append((preset, params, flops.matmul_params, flops.causal_per_token, summary))
    lines = [f"{args.steps} steps of batch {cfg.batch_size} x {cfg.seq_len} bytes each, fsdp=8, "
             f"seed {cfg.seed}; eval loss over "
             f"{args.eval_batches} held-out batches (nats/byte).", "",
             "| model | parameters | active matmul parameters | training FLOPs/token | "
             "final train loss | eval loss | tokens/s (CPU) |", "|---|---|---|---|---|---|---|"]
    for preset, params, active, per_token, s in rows:
        lines.append(f"| {preset} | {params:,} | {active:,} | {per_token / 1e6:.2f}M | "
                     f"{s['final_loss']:.4f} | {s['final_eval_loss']:.4f} | "
                     f"{s['tokens_per_sec']:,.0f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
