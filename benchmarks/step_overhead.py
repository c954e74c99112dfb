"""What the jaxscale train step costs over a hand-written `jax.jit` step of the same model.

Both sides train the same decoder from the same initial state and batch on the same mesh, with
the same optimizer (the run's, from `optim.make_optimizer`), the same state and batch shardings
and the state donated:

* jaxscale: `jaxscale.run.build(cfg)` -> `run.init_state()` -> `run.train_step`, the step the
  trainer runs (gradient accumulation, masking, z-loss, the schedule, the non-finite guard and the
  metrics included, as in training);
* hand-written: `model.apply` (on the same tokens, positions and segment ids) ->
  `optax.softmax_cross_entropy_with_integer_labels(...).mean()` ->
  `jax.value_and_grad` -> `tx.update` -> `optax.apply_updates`. The model is traced inside
  `sharding.activation_sharding` as in jaxscale, so its own activation constraints apply on both
  sides (without them the model is a different, slower program; see BENCHMARKS.md).

Both are compiled ahead of time (compile time reported), warmed up, then timed alternately
(A B A B ...), blocking on every step's outputs. Reports medians and spread, tokens/s, MFU against
a float32 matmul timed in the same run, and bytes per device from `memory_analysis()`.

    python benchmarks/step_overhead.py                     # fsdp=8 on 8 simulated CPU devices
    python benchmarks/step_overhead.py --steps 30 --mesh-fsdp 4 --mesh-tensor 2 --rules fsdp_tp

The last line is ``ratio: X`` with X = jaxscale throughput / hand-written throughput (= the
hand-written median step time / the jaxscale median step time); the bar is X >= 0.98. On a
shared CPU whole-step differences under ~15% are noise between runs; the alternation makes the
two sides of one run comparable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (>= 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side after compiling")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="simulated CPU devices (sets XLA_FLAGS before jax starts); 0 = leave the "
                        "platform and device count alone")
    p.add_argument("--mesh-data", type=int, default=1)
    p.add_argument("--mesh-fsdp", type=int, default=-1, help="-1 = the remaining devices")
    p.add_argument("--mesh-tensor", type=int, default=1)
    p.add_argument("--rules", default="fsdp", help="sharding rule preset")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="model compute dtype")
    p.add_argument("--remat", default="none")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error(f"--steps={args.steps}: time at least 10 steps per side")
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.cpu_devices:
        # Before jax is imported anywhere: the device count is read when the backend starts.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import optax
    from common import random_batch

    from jaxscale import config as config_lib
    from jaxscale.analysis import metrics
    from jaxscale.core import sharding as shd
    from jaxscale.models import build_model
    from jaxscale.run.build import build

    cfg = config_lib.from_dict({
        "steps": 1000, "batch_size": args.batch, "seq_len": args.seq,
        "model": {"num_layers": args.layers, "d_model": args.d_model, "num_heads": args.heads,
                  "d_ff": args.d_ff, "vocab_size": args.vocab, "max_seq_len": args.seq,
                  "dtype": args.dtype, "remat": args.remat},
        "mesh": {"data": args.mesh_data, "fsdp": args.mesh_fsdp, "tensor": args.mesh_tensor},
        "sharding": {"rules": args.rules},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
    })
    model_cfg = cfg.model
    run = build(cfg)
    mesh, rules, tx = run.mesh, run.rules, run.tx
    batch = jax.device_put(random_batch(run), run.batch_shardings)  # one document per row
    rng = jax.random.key(0)

    # --- jaxscale ---------------------------------------------------------------------------
    state = run.init_state()
    initial = jax.device_get(state)  # the hand-written side starts from the same values
    start = time.perf_counter()
    js_compiled = run.lower(state, batch, rng).compile()
    js_compile_s = time.perf_counter() - start

    # --- hand-written -----------------------------------------------------------------------
    model = build_model(model_cfg)

    def loss_fn(params, batch):
        # The same model inputs as jaxscale's step: tokens, positions and segment ids.
        logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                             batch["segment_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        ).mean()

    def hand_step(params, opt_state, batch):
        with shd.activation_sharding(mesh, rules):  # the model's constrain() calls take effect
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    shardings = run.shardings
    params = jax.device_put(initial.params, shardings.params)
    opt_state = jax.device_put(initial.opt_state, shardings.opt_state)
    start = time.perf_counter()
    hand_compiled = jax.jit(
        hand_step,
        in_shardings=(shardings.params, shardings.opt_state, run.batch_shardings),
        out_shardings=(shardings.params, shardings.opt_state, None),
        donate_argnums=(0, 1),
    ).lower(params, opt_state, batch).compile()
    hand_compile_s = time.perf_counter() - start

    # --- run: warm up, then alternate -------------------------------------------------------
    def run_jaxscale():
        nonlocal state
        state, out = js_compiled(state, batch, rng)
        jax.block_until_ready((state, out))
        return out["loss"]

    def run_hand():
        nonlocal params, opt_state
        params, opt_state, loss = hand_compiled(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, loss))
        return loss

    first_js, first_hand = float(run_jaxscale()), float(run_hand())
    for _ in range(args.warmup - 1):
        run_jaxscale()
        run_hand()
    times: dict[str, list[float]] = {"jaxscale": [], "hand": []}
    for _ in range(args.steps):
        for name, fn in (("jaxscale", run_jaxscale), ("hand", run_hand)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    last_js, last_hand = float(run_jaxscale()), float(run_hand())

    # --- report -----------------------------------------------------------------------------
    peak = metrics.measure_matmul_flops(1024)  # whole machine: one matmul uses every core
    flops = metrics.flops_per_token(model_cfg, args.seq)
    tokens_per_step = args.batch * args.seq
    sizes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {sizes}; "
          f"rules {args.rules}")
    print(f"model: L={args.layers} D={args.d_model} heads={args.heads} F={args.d_ff} "
          f"V={args.vocab} dtype={args.dtype} remat={args.remat}; batch {args.batch} x "
          f"{args.seq} tokens; {flops.matmul_params / 1e6:.2f}M matmul params")
    print(f"FLOPs/token: {flops.causal_per_token / 1e6:.1f}M causal, "
          f"{flops.noncausal_per_token / 1e6:.1f}M non-causal (6N+12LHQT); "
          f"matmul peak (f32 1024^3, same run): {peak / 1e9:.1f} GFLOP/s")
    print(f"loss, first step: jaxscale {first_js:.6f}, hand {first_hand:.6f}; after "
          f"{args.warmup + args.steps + 1} steps: jaxscale {last_js:.6f}, hand {last_hand:.6f}")
    header = (f"{'':9} {'compile_s':>9} {'median_ms':>9} {'min_ms':>8} {'max_ms':>8} "
              f"{'iqr_ms':>8} {'tokens/s':>9} {'MFU%':>6} {'MFU%nc':>6} {'MiB/device':>10}")
    print(header)
    for name, compiled, compile_s in (("jaxscale", js_compiled, js_compile_s),
                                      ("hand", hand_compiled, hand_compile_s)):
        t = sorted(times[name])
        med = statistics.median(t)
        q1, _, q3 = statistics.quantiles(t, n=4)
        tps = tokens_per_step / med
        mem = metrics.compiled_stats(compiled)
        print(f"{name:9} {compile_s:9.2f} {med * 1e3:9.2f} {t[0] * 1e3:8.2f} {t[-1] * 1e3:8.2f} "
              f"{(q3 - q1) * 1e3:8.2f} {tps:9.0f} "
              f"{100 * tps * flops.causal_per_token / peak:6.2f} "
              f"{100 * tps * flops.noncausal_per_token / peak:6.2f} "
              f"{mem.peak_bytes / 2**20:10.2f}")
    # Load-independent evidence: what XLA compiled for each side.
    js_stats = metrics.compiled_stats(js_compiled)
    hand_stats = metrics.compiled_stats(hand_compiled)
    if js_stats.flops and hand_stats.flops:
        extra = 100 * (js_stats.flops / hand_stats.flops - 1)
        print(f"XLA FLOPs per device and step: jaxscale {js_stats.flops / 1e9:.3f}G, hand "
              f"{hand_stats.flops / 1e9:.3f}G ({extra:+.2f}%); temp bytes: jaxscale "
              f"{js_stats.temp_bytes / 2**20:.2f} MiB, hand "
              f"{hand_stats.temp_bytes / 2**20:.2f} MiB ({js_stats.temp_bytes} and "
              f"{hand_stats.temp_bytes} bytes)")
    per_pair = [h / j for h, j in zip(times["hand"], times["jaxscale"], strict=True)]
    print(f"per-pair ratios (hand/jaxscale): median {statistics.median(per_pair):.3f}, "
          f"min {min(per_pair):.3f}, max {max(per_pair):.3f}; ratio of fastest steps "
          f"{min(times['hand']) / min(times['jaxscale']):.3f}")
    ratio = statistics.median(times["hand"]) / statistics.median(times["jaxscale"])
    print(f"ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
