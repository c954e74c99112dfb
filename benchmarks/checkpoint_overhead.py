"""What a checkpoint save costs the training loop: async (orbax background writes), synchronous,
and the local tier (checkpoint.local_dir); and how fast a step is verified against its manifest.

The tiny preset's run (`jaxscale.run.build`: its model, optimizer, mesh, rules and train step; 8
simulated CPU devices by default), trained on random tokens (the data pipeline is not what is
measured). Segments of `--every` steps run in
four kinds, alternating (none, async, sync, local, none, async, ...):

* none:  `every` steps;
* async: a save with checkpoint.async_save=true, then `every` steps while it is written;
* sync:  a save with checkpoint.async_save=false, then `every` steps;
* local: a save to the local tier (checkpoint.local_dir under `--local-dir`, default the
         checkpoint directory; /dev/shm is the fast choice), then `every` steps while its
         writer thread runs.

Every step is timed on its own (blocking on its outputs, the same in all three kinds). A save's
cost is the time of the save call, plus, for async, what the steps that ran while the background
write was in flight took beyond the median step of the `none` segments, plus any wait left for the
write at the end of the segment (it would be paid at the next save). Summing only the steps that
overlap the write keeps the estimate out of the noise of whole segments on a shared machine;
whole-segment medians are printed beside it as a cross-check.

    python benchmarks/checkpoint_overhead.py                   # tiny, every=50, 3 rounds
    python benchmarks/checkpoint_overhead.py --every 10 --rounds 5 --local-dir /dev/shm/x

The cost is reported per save, in steps, and as a fraction of the training time between two
saves (`every` x the median step). The last line is ``ratio: X`` with X = async cost / sync cost
per save; the bar is an async cost under 5% of training time at every=50, and a local save
under 2% at every=10. Before it, `verify: ...` gives the rate `verify.verify_step` checks a
`--verify-mib` MiB step of random files at (the page cache warm: the hashing, not the disk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="preset or YAML file (default: tiny)")
    p.add_argument("--every", type=int, default=50, help="steps between saves")
    p.add_argument("--rounds", type=int, default=3, help="segments of each kind (>= 2)")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="simulated CPU devices (set before jax starts); 0 = leave them alone")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    p.add_argument("--local-dir", default=None,
                   help="the local tier's directory (default: under --dir)")
    p.add_argument("--verify-mib", type=int, default=512,
                   help="size of the step whose verification is timed (0: skip)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    return args


def verify_rate(root: str, mib: int) -> float:
    """Seconds per GiB `verify.verify_step` takes over a step of `mib` MiB of random files (16
    of them), written and hashed into a manifest first; printed and returned."""
    from jaxscale.checkpoint import verify

    step_dir = os.path.join(root, "verify-rate", "1")
    os.makedirs(os.path.join(step_dir, "state"), exist_ok=True)
    for i in range(16):
        with open(os.path.join(step_dir, "state", f"f{i}"), "wb") as f:
            f.write(os.urandom((mib << 20) // 16))
    verify.write_manifest(step_dir)
    start = time.perf_counter()
    problem = verify.verify_step(step_dir)
    seconds = time.perf_counter() - start
    assert problem is None, problem
    per_gib = seconds / (mib / 1024)
    print(f"verify: {mib} MiB in {seconds:.3f}s = {per_gib:.3f} s per GiB "
          f"({mib / seconds:,.0f} MiB/s, {verify.DEFAULT_HASH})", flush=True)
    return per_gib


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    from jaxscale.run.devices import set_cpu_devices

    set_cpu_devices(args.cpu_devices or None)

    import jax
    from common import random_batch

    from jaxscale import config as config_lib
    from jaxscale.checkpoint.manager import Checkpointer
    from jaxscale.run.build import build

    root = args.dir or tempfile.mkdtemp(prefix="jaxscale-ckpt-bench-")
    cfg = config_lib.load(args.config, [*args.overrides, f"workdir={root}", "progress=false"])
    run = build(cfg)
    mesh = run.mesh
    state = run.init_state()
    step_fn = run.train_step
    batch = jax.device_put(random_batch(run), run.batch_shardings)
    rng = jax.random.key(cfg.seed)

    def checkpointer(kind: str) -> Checkpointer:
        local = {} if kind != "local" else {
            "checkpoint.every": 10**9, "checkpoint.local_every": args.every,
            "checkpoint.local_dir": args.local_dir or os.path.join(root, "local-tier")}
        c = config_lib.replace(cfg, **{
            "checkpoint.dir": os.path.join(root, kind), "checkpoint.every": args.every,
            "checkpoint.async_save": kind == "async", "checkpoint.keep": 2, "steps": 10**9,
            **local,
        })
        ckpt = Checkpointer(c, mesh, log=lambda message: None)
        ckpt.restore_or_init(lambda: state, run.abstract, run.shardings, rng=rng)
        return ckpt

    if args.verify_mib:
        verify_rate(root, args.verify_mib)
    savers = {kind: checkpointer(kind) for kind in ("async", "sync", "local")}
    saved = [0]

    def segment(kind: str, s):
        """One segment: (state, its seconds, the save call's seconds, [(step seconds, writing)],
        seconds waited for the write at the end)."""
        start = time.perf_counter()
        in_save = 0.0
        ckpt = savers.get(kind)
        if ckpt is not None:
            saved[0] += args.every
            ckpt.save(saved[0], s, {"step": saved[0]})
            in_save = time.perf_counter() - start
        steps = []
        for _ in range(args.every):
            writing = ckpt is not None and ckpt.saving()
            t = time.perf_counter()
            s, metrics = step_fn(s, batch, rng)
            jax.block_until_ready((s, metrics))
            steps.append((time.perf_counter() - t, writing))
        t = time.perf_counter()
        if ckpt is not None:
            ckpt.wait()
        waited = time.perf_counter() - t
        return s, time.perf_counter() - start, in_save, steps, waited

    compile_start = time.perf_counter()
    state, _ = step_fn(state, batch, rng)
    jax.block_until_ready(state)
    print(f"{args.config}: {jax.device_count()} devices, mesh {dict(mesh.shape)}, batch "
          f"{cfg.batch_size}x{cfg.seq_len}, {sum(x.size for x in jax.tree.leaves(state)) / 1e6:.2f}"
          f"M numbers in the state; compiled in {time.perf_counter() - compile_start:.1f}s",
          flush=True)
    for kind in savers:  # the first save of each kind sets up directories and threads
        state = segment(kind, state)[0]

    results: dict[str, list] = {"none": [], "async": [], "sync": [], "local": []}
    for r in range(args.rounds):
        for kind in results:
            state, seconds, in_save, steps, waited = segment(kind, state)
            results[kind].append((seconds, in_save, steps, waited))
            overlapped = sum(w for _, w in steps)
            print(f"round {r + 1} {kind:5s}: {seconds:7.2f}s"
                  + (f"  save call {in_save * 1e3:5.0f} ms, write overlapped {overlapped} steps, "
                     f"waited {waited * 1e3:.0f} ms at the end" if kind != "none" else ""),
                  flush=True)
    for saver in reversed(list(savers.values())):  # the signal handlers go back in order
        saver.close()

    step_time = statistics.median(t for _, _, steps, _ in results["none"] for t, _ in steps)
    train_time = args.every * step_time
    segments = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    print(f"median step {step_time * 1e3:.1f} ms; {args.every} steps between saves = "
          f"{train_time:.2f}s of training")
    cost = {}
    for kind in ("async", "sync", "local"):
        per_save = [in_save + sum(t - step_time for t, w in steps if w) + waited
                    for _, in_save, steps, waited in results[kind]]
        cost[kind] = statistics.median(per_save)
        print(f"{kind:5s}: {cost[kind] * 1e3:6.0f} ms per save = {cost[kind] / step_time:5.2f} "
              f"steps = {100 * cost[kind] / train_time:5.2f}% of training time at every="
              f"{args.every} (whole segments: {segments[kind] - segments['none']:+.2f}s)")
    ratio = cost["async"] / cost["sync"]
    print(f"ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
