"""Generation throughput of `jaxscale.generate.Generator` on 8 simulated CPU devices.

One table, measured in one process: for the tiny and the gpt2-small preset shapes (random
parameters, float32), each row a mesh and a number of prompts, greedy decoding (temperature 0)
with no end-of-sequence id, so every row generates the full count of new tokens. The prefill and
decode times are the Generator's own (`Generation.prefill_seconds`, `.decode_seconds`: the
prompts' forward pass, then the jitted sampling loop, each blocked until done); compilation is
excluded (one untimed call per row compiles and warms up). The rows of one model are timed
round-robin, one `generate` call each in turn.

A mesh splits the batch over its batch axes, so the Generator pads the prompts up to a multiple
of those devices ("rows run"); tokens/s counts only the prompts' own tokens.

    python benchmarks/generate_decode.py
    python benchmarks/generate_decode.py --quick
    python benchmarks/generate_decode.py --models tiny --meshes fsdp,dp --batches 8 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import median_spread, round_robin, simulate_devices

# name -> (the mesh as the table shows it, its config overrides)
MESHES = {
    "fsdp": ("fsdp=8", ["mesh.fsdp=8"]),
    "dp": ("data=8, rules dp", ["mesh.fsdp=1", "mesh.data=8", "sharding.rules=dp"]),
    "fsdp_tp": ("fsdp=4 x tensor=2", ["mesh.fsdp=4", "mesh.tensor=2"]),
}
# preset -> (prompt tokens, new tokens, prompts per call, timed calls per row): the sizes of the
# full run, chosen so that the whole table takes a few minutes on a 2-core machine (a gpt2-small
# decode step streams all 124M float32 parameters through every device: about a second here).
MODELS = {
    "tiny": (64, 64, (1, 8), 10),
    "gpt2-small": (16, 8, (8,), 3),
}
QUICK = {"tiny": (16, 8, (1, 8), 5)}
QUICK_MESHES = ("fsdp",)
BASE = ["data.source=synthetic", "model.dtype=float32", "model.param_dtype=float32"]
HEADER = ("| model | mesh | batch | rows run | prompt tokens | new tokens | prefill ms (median) | "
          "decode ms (median) | decode min-max | decode tokens/s | ms per decode step | "
          "prefill tokens/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=0,
                   help="timed generate calls per row (0 = the model's: tiny 10, gpt2-small 3)")
    p.add_argument("--quick", action="store_true",
                   help="tiny only, fsdp=8, 16 prompt and 8 new tokens, 5 calls per row")
    p.add_argument("--models", default="", help=f"comma-separated, of {', '.join(MODELS)} "
                   "(default: all; --quick: tiny)")
    p.add_argument("--meshes", default="", help=f"comma-separated, of {', '.join(MESHES)} "
                   "(default: all; --quick: fsdp)")
    p.add_argument("--batches", default="", help="prompts per call, comma-separated (default: "
                   "the model's: tiny 1,8, gpt2-small 8)")
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (0 = the model's)")
    p.add_argument("--new-tokens", type=int, default=0, help="new tokens (0 = the model's)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every row (e.g. model.num_layers=2)")
    args = p.parse_args(argv)
    args.models, args.meshes = (_names(p, flag, value, table) for flag, value, table in
                                (("--models", args.models, MODELS),
                                 ("--meshes", args.meshes, MESHES)))
    try:
        args.batches = tuple(int(b) for b in args.batches.split(",") if b)
    except ValueError:
        p.error(f"--batches={args.batches!r}: comma-separated numbers of prompts, e.g. 1,8")
    simulate_devices(8)
    return args


def _names(parser, flag: str, value: str, table: dict) -> tuple[str, ...]:
    names = tuple(n for n in value.split(",") if n)
    bad = [n for n in names if n not in table]
    if bad:
        parser.error(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(table)}")
    return names


class Row:
    """One Generator (a model on a mesh) and its prompts; calling it runs one `generate`."""

    def __init__(self, name, mesh_label, cfg, params, prompts, new_tokens):
        from jaxscale.generate import Generator

        self.name, self.mesh_label, self.cfg = name, mesh_label, cfg
        self.gen = Generator(cfg, params, tokenizer=None)
        self.prompts, self.new_tokens = prompts, new_tokens
        self.rows = self.gen._batch_rows(len(prompts))  # the batch after padding to the mesh
        self.outs = []

    def __call__(self):
        out = self.gen.generate(self.prompts, max_new_tokens=self.new_tokens, temperature=0.0,
                                eos_ids=())
        assert out.new_tokens == len(self.prompts) * self.new_tokens, out.new_tokens
        self.outs.append(out)

    def line(self, warmup: int) -> str:
        outs = self.outs[warmup:]
        prefill_ms = 1e3 * statistics.median(o.prefill_seconds for o in outs)
        decode_ms, lo, hi = median_spread([o.decode_seconds for o in outs])
        new = outs[0].new_tokens
        prompt = outs[0].prompt_tokens
        return (f"| {self.name} | {self.mesh_label} | {len(self.prompts)} | {self.rows} | "
                f"{prompt} | {new} | {prefill_ms:.1f} | {decode_ms:.1f} | {lo:.1f}-{hi:.1f} | "
                f"{_rate(new, decode_ms)} | {decode_ms / self.new_tokens:.2f} | "
                f"{_rate(prompt, prefill_ms)} |")


def _rate(tokens: int, ms: float) -> str:
    per_s = tokens / ms * 1e3
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _params(cfg):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxscale.models.decoder import Decoder

    variables = Decoder(cfg.model).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables["params"])


def _model_rows(preset, sizes, meshes, args) -> list[Row]:
    import numpy as np

    from jaxscale import config as config_lib

    prompt_len, new, batches, _ = sizes
    prompt_len = args.prompt_len or prompt_len
    new = args.new_tokens or new
    batches = args.batches or batches
    base = [*BASE, *args.overrides]
    params = _params(config_lib.load(preset, base))
    rng = np.random.default_rng(0)
    rows = []
    for key in meshes:
        label, mesh = MESHES[key]
        cfg = config_lib.load(preset, [*base, *mesh])
        for batch in batches:
            prompts = [rng.integers(1, cfg.model.vocab_size, prompt_len, dtype=np.int32)
                       for _ in range(batch)]
            rows.append(Row(preset, label, cfg, params, prompts, new))
    return rows


def main(argv=None) -> str:
    args = parse_args(argv)
    import gc

    models = QUICK if args.quick else MODELS
    models = {m: models.get(m, MODELS[m]) for m in (args.models or models)}
    meshes = args.meshes or (QUICK_MESHES if args.quick else tuple(MESHES))
    warmup = 1
    lines, notes = [HEADER], []
    for preset, sizes in models.items():
        steps = args.steps or sizes[3]
        # One model's rows at a time, round-robin among themselves; freed before the next.
        rows = _model_rows(preset, sizes, meshes, args)
        round_robin(rows, steps, warmup=warmup)
        lines += [row.line(warmup) for row in rows]
        m = rows[0].cfg.model
        notes.append(f"{preset} {m.num_layers} layers x {m.d_model} (MLP {m.d_ff}, "
                     f"{m.num_heads} heads, {m.num_kv_heads or m.num_heads} kv heads, vocab "
                     f"{m.vocab_size}), {steps} timed calls per row")
        del rows
        gc.collect()
    head = (f"Models: {'; '.join(notes)}. Random parameters, float32 compute and weights, "
            "greedy, no end-of-sequence id; 1 untimed call per row first (compiles), then the "
            "rows of a model called round-robin.")
    table = "\n".join([head, "", *lines])
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
