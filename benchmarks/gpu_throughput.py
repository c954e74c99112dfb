"""Single-device throughput and MFU of the jaxscale train step, swept over batch and remat.

For each (model, seq, remat, batch) candidate: build the config from the preset and its run
(`jaxscale.run.build`, on one device), compile the run's train step ahead of time, skip it if the
compiled memory analysis says it does not fit the device, then time warm steps with async
dispatch (block only at the end of each timed window) and report tokens/s,
step time, MFU (causal count; the non-causal 6N+12LHQT figure too), MFU against the measured bf16
matmul rate, peak memory and the attention kernel in the compiled HLO. Each candidate that beats
the best MFU so far for its model is profiled (jax.profiler) and the trace summarised by kernel
category (jaxscale.analysis.tracing).

    python benchmarks/gpu_throughput.py                      # the sweep (scripts/gpu_benchmark.sh)
    python benchmarks/gpu_throughput.py --tiny --out /tmp/g  # the same path on the CPU, tiny

Prints one line per candidate as it finishes and a table at the end; writes results.jsonl,
the table (table.md) and the profile summaries (device busy/idle, time per kernel category)
under --out. The profile's idle fraction is the check that async dispatch keeps the device fed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import sys
import time
import traceback

# The launcher's GPU flags, before jax starts (a no-op for CPU runs).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxscale.xla_flags import apply_gpu_flags  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Candidate:
    preset: str  # config preset
    seq_len: int  # tokens per sequence
    remat: str  # remat policy
    batch: int  # sequences per step
    overrides: tuple[str, ...] = ()  # further config overrides
    form: str = "preset"  # the layer/loss form (FORMS), its overrides among `overrides`

    @property
    def name(self) -> str:
        extra = "".join(f" {o}" for o in self.overrides)
        return f"{self.preset} T={self.seq_len} B={self.batch} remat={self.remat}{extra}"


# --forms: the same candidate run in several forms, side by side (after --set's overrides).
FORMS = {
    "preset": (),
    "scan": ("model.scan_layers=true", "model.scan_unroll=1"),  # one layer per loop iteration
    "scan_unroll2": ("model.scan_layers=true", "model.scan_unroll=2"),  # two per iteration
    "unrolled": ("model.scan_layers=false",),  # every layer inlined
    "unchunked_loss": ("loss.chunked=never",),  # whole-vocabulary logits
}


# What the GPU sweep tries, per model: (preset, seq, remats, batches). Bigger batches first within
# a remat policy would waste compiles on OOMs, so the ladder goes up and stops at the first misfit.
GPU_SWEEP = (
    ("gpt2-small", 1024, ("none", "minimal", "save_dots"), (16, 32, 64)),
    ("llama-1b", 2048, ("minimal", "save_dots", "full", "none"), (4, 8, 16)),
)
TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.d_ff=128", "model.vocab_size=256", "model.max_seq_len=64", "model.dtype=float32"]
TINY_SWEEP = (("tiny", 64, ("none", "full"), (4, 8)),)


def measure_bf16_matmul(size: int, calls: int = 20) -> float:
    """FLOP/s of a bf16 size^3 matmul on the default device: `calls` products queued back to back
    (after as many untimed ones, so the clocks have ramped up), median of 3 such windows."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
    b = jax.random.normal(keys[1], (size, size), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    for _ in range(calls):
        out = mm(a, b)
    out.block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            out = mm(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / calls)
    return 2.0 * size**3 / statistics.median(times)


def _rel_error(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check_attention() -> list[str]:
    """The model's attention ("auto": cuDNN on a GPU) against the float32 reference, forward and
    gradients, with and without segment ids (packed documents); bf16 inputs, fresh random data.
    Returns one line per case with the relative errors."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxscale.models.decoder import attention

    B, T, N, K, H = 2, 256, 8, 2, 64
    keys = jax.random.split(jax.random.key(7), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H), jnp.bfloat16)
               for kk, n in zip(keys[:3], (N, K, K), strict=True))
    cot = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)
    starts = np.zeros((B, T), np.int32)
    starts[:, [0, 50, 51, 180]] = 1  # documents of 50, 1, 129 and 76 tokens
    segments = jnp.asarray(np.cumsum(starts, axis=1))

    def run(impl, dtype, seg):
        def f(q, k, v):
            out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, impl)
            return jnp.sum(out.astype(jnp.float32) * cot), out
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [out, *grads]

    lines = []
    for seg in (None, segments):
        got = run("auto", jnp.bfloat16, seg)
        ref = run("reference", jnp.float32, seg)
        errs = [_rel_error(a, b) for a, b in zip(got, ref, strict=True)]
        ok = all(np.isfinite(e) and e < 2e-2 for e in errs)
        lines.append(f"attention check ({'segment ids' if seg is not None else 'causal only'}): "
                     f"rel. error out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, "
                     f"dv {errs[3]:.1e}: {'ok' if ok else 'FAIL'}")
    return lines


def _device_memory_limit() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_limit", 0)) or None


def unpacked_lm(cfg):
    """The LM task without segment ids: one causal sequence per row, no document mask (the
    attention the GPU tables in benchmarks/RESULTS.md were measured with; --packed uses the
    training batches' five fields instead)."""
    from jaxscale.tasks.lm import LanguageModel

    class UnpackedLM(LanguageModel):
        def batch_spec(self, batch_size: int):
            spec = super().batch_spec(batch_size)
            del spec["segment_ids"]
            return spec

    return UnpackedLM(seq_len=cfg.seq_len, z_loss=cfg.z_loss)


def build_candidate(cand: Candidate, tiny: bool, packed: bool = False):
    """(run, compiled step, compile seconds, stats) of a candidate on one device, compiled ahead
    of time from abstract shapes (nothing allocated yet)."""
    import jax

    from jaxscale import config as config_lib
    from jaxscale.analysis import metrics
    from jaxscale.analysis.inspection import compile_run
    from jaxscale.config import MeshConfig
    from jaxscale.core.mesh import make_mesh
    from jaxscale.run.build import build

    overrides = [f"batch_size={cand.batch}", f"seq_len={cand.seq_len}",
                 f"model.remat={cand.remat}", "mesh.fsdp=1", *cand.overrides]
    cfg = config_lib.load(cand.preset, (TINY if tiny else []) + overrides)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    run = build(cfg, task=None if packed else unpacked_lm(cfg), mesh=mesh)
    c = compile_run(run)
    return run, c.compiled, c.compile_s, metrics.compiled_stats(c.compiled)


def run_candidate(cand: Candidate, args, peak: float, measured: float, out: pathlib.Path,
                  best_mfu: float) -> dict:
    """Compile, fit-check, time; profile too when this candidate beats `best_mfu`."""
    import jax
    from common import random_batch

    from jaxscale.analysis import metrics

    run, compiled, compile_s, stats = build_candidate(cand, args.tiny, args.packed)
    cfg = run.cfg
    hlo = compiled.as_text()
    attention = "cudnn" if "__cudnn$fmha" in hlo else "xla"
    result = {
        "model": cand.preset, "seq_len": cand.seq_len, "batch": cand.batch, "remat": cand.remat,
        "form": cand.form, "overrides": list(cand.overrides), "packed": args.packed,
        "compile_s": round(compile_s, 2),
        "peak_bytes": stats.peak_bytes, "temp_bytes": stats.temp_bytes, "attention": attention,
        "device": jax.devices()[0].device_kind, "flags": os.environ.get("XLA_FLAGS", ""),
    }
    limit = _device_memory_limit()
    if limit is not None and stats.peak_bytes > limit:
        need, have = stats.peak_bytes / 2**30, limit / 2**30
        result["status"] = f"does not fit ({need:.1f} GiB > {have:.1f})"
        return result
    state = run.init_state()
    batch = jax.device_put(random_batch(run), run.batch_shardings)
    rng = jax.random.key(1)
    for _ in range(args.warmup):
        state, m = compiled(state, batch, rng)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, m = compiled(state, batch, rng)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - start) / args.steps)
    loss = float(m["loss"])  # one host read after timing: the run is finite and learning
    step_s = statistics.median(times)
    flops = metrics.flops_per_token(cfg.model, cfg.seq_len)
    tokens_per_s = cfg.batch_size * cfg.seq_len / step_s
    result.update(
        status="ok", step_s=step_s, step_spread=(min(times), max(times)),
        tokens_per_s=tokens_per_s,
        mfu=metrics.mfu(tokens_per_s, flops.causal_per_token, 1, peak),
        mfu_noncausal=metrics.mfu(tokens_per_s, flops.noncausal_per_token, 1, peak),
        mfu_vs_measured=metrics.mfu(tokens_per_s, flops.causal_per_token, 1, measured),
        loss=loss, params=int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
    )
    if args.profile_steps and result["mfu"] > best_mfu:
        result["profile"] = profile(result, (compiled, state, batch, rng), args, out)
        if args.dump_hlo:  # the optimized HLO, to look up the fusions the profile names
            (out / f"hlo_{cand.preset}.txt").write_text(hlo)
    return result


def profile(result: dict, run: tuple, args, out: pathlib.Path) -> str:
    """Trace a few steps; write and return the per-category summary."""
    import jax

    from jaxscale.analysis.tracing import summarize_trace

    compiled, state, batch, rng = run
    trace_dir = out / f"trace_{result['model']}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    jax.profiler.start_trace(str(trace_dir))
    for _ in range(args.profile_steps):
        state, m = compiled(state, batch, rng)
    jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    summary = summarize_trace(trace_dir)
    text = summary.format(steps=args.profile_steps)
    (out / f"profile_{result['model']}.txt").write_text(text + "\n")
    if args.keep_traces:  # the raw trace, at most two folders down for the device tool
        xplane = max(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_size)
        shutil.copy(xplane, out / f"{result['model']}.xplane.pb")
    shutil.rmtree(trace_dir, ignore_errors=True)
    return text


def format_table(rows: list[dict]) -> str:
    head = ("| model | seq | batch | remat | status | step (ms) | tokens/s | MFU | MFU non-causal"
            " | MFU vs measured matmul | peak mem (GiB) | attention | compile (s) | form |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        form = r.get("form", "preset")
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['remat']} | "
                         f"{r.get('status', '?')} | | | | | | "
                         f"{r.get('peak_bytes', 0) / 2**30:.1f} | | {r.get('compile_s', '')} | "
                         f"{form} |")
            continue
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['remat']} | ok | "
            f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{100 * r['mfu_noncausal']:.1f}% | {100 * r['mfu_vs_measured']:.1f}% | "
            f"{r['peak_bytes'] / 2**30:.1f} | {r['attention']} | {r['compile_s']:.0f} | {form} |")
    return "\n".join(lines)


def format_forms(rows: list[dict], forms: list[str]) -> str:
    """Each form's step time against the first form's, per (model, seq, batch, remat)."""
    base, rest = forms[0], forms[1:]
    head = (f"| model | seq | batch | remat | {base} step (ms) | "
            + " | ".join(f"{f} step (ms), ratio to {base}" for f in rest) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ok = {(r["model"], r["seq_len"], r["batch"], r["remat"], r.get("form")): r["step_s"]
          for r in rows if r.get("status") == "ok"}
    for model, seq, batch, remat, form in ok:
        if form != base:
            continue
        ref = ok[model, seq, batch, remat, base]
        cells = []
        for f in rest:
            t = ok.get((model, seq, batch, remat, f))
            cells.append(f"{1e3 * t:.1f}, {t / ref:.3f}" if t else "-")
        lines.append(f"| {model} | {seq} | {batch} | {remat} | {1e3 * ref:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def candidates(args) -> list[list[Candidate]]:
    sweep = TINY_SWEEP if args.tiny else GPU_SWEEP
    groups = []
    for preset, seq, remats, batches in sweep:
        if args.models and preset not in args.models:
            continue
        remats = args.remats or remats
        batches = args.batches or batches
        groups.append([Candidate(preset, seq, r, b, (*args.set, *FORMS[f]), f) for r in remats
                       for b in batches for f in args.forms])
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a check)")
    parser.add_argument("--models", nargs="*", default=None, help="presets to run (default all)")
    parser.add_argument("--remats", nargs="*", default=None, help="override the remat ladder")
    parser.add_argument("--batches", nargs="*", type=int, default=None, help="override batches")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every candidate (e.g. model.scan_layers=false)")
    parser.add_argument("--forms", nargs="+", default=["preset"], choices=list(FORMS),
                        help="run each candidate in these forms, side by side (FORMS)")
    parser.add_argument("--packed", action="store_true",
                        help="train on the LM task's full batches (segment ids: attention with the "
                             "document mask, as in training); default: causal only, no mask")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows (median taken)")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="steps traced for the best candidate per model (0 = no profile)")
    parser.add_argument("--keep-traces", action="store_true", help="copy the raw traces to --out")
    parser.add_argument("--dump-hlo", action="store_true",
                        help="write the compiled HLO of each profiled candidate to --out")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="start no new candidate after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_results"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    added = apply_gpu_flags()
    import jax

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    from jaxscale.analysis import metrics

    peak = metrics.peak_flops_per_device(device)
    measured = measure_bf16_matmul(512 if args.tiny else 8192)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, peak "
          f"{peak / 1e12:.0f} TFLOP/s, measured bf16 matmul {measured / 1e12:.1f} TFLOP/s; "
          f"XLA flags added: {' '.join(added) or 'none'}", flush=True)
    for line in check_attention():
        print(line, flush=True)
    rows = []
    with open(out / "results.jsonl", "a") as log:
        for group in candidates(args):
            best = None
            failed_remat: set[str] = set()
            for cand in group:
                if time.perf_counter() - t0 > args.deadline_s:
                    print(f"deadline: skipping {cand.name}", flush=True)
                    continue
                if (cand.remat, cand.form) in failed_remat:
                    continue  # a smaller batch of this policy already did not fit
                try:
                    r = run_candidate(cand, args, peak, measured, out,
                                      best["mfu"] if best else -1.0)
                except Exception as e:  # OOM at run time, unsupported kernel...: record it
                    traceback.print_exc()
                    r = {"model": cand.preset, "seq_len": cand.seq_len, "batch": cand.batch,
                         "remat": cand.remat, "form": cand.form,
                         "status": f"error: {str(e).splitlines()[0][:120]}"}
                if r.get("status") != "ok":
                    failed_remat.add((cand.remat, cand.form))
                row = {k: v for k, v in r.items() if k != "profile"}
                rows.append(row)
                log.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **row}) + "\n")
                log.flush()
                print(f"{cand.name}: " + (
                    f"{1e3 * r['step_s']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
                    f"{100 * r['mfu']:.1f}% (non-causal {100 * r['mfu_noncausal']:.1f}%), peak "
                    f"{r['peak_bytes'] / 2**30:.2f} GiB, attention {r['attention']}, loss "
                    f"{r['loss']:.3f}"
                    if r.get("status") == "ok" else r["status"]), flush=True)
                if r.get("status") == "ok" and (best is None or r["mfu"] > best["mfu"]):
                    best = r
                if "profile" in r:
                    print(f"profile of {cand.name} (best so far):\n{r['profile']}", flush=True)
            if best is not None:
                print(f"best {best['model']}: B={best['batch']} remat={best['remat']} MFU "
                      f"{100 * best['mfu']:.1f}% {best['tokens_per_s']:,.0f} tokens/s", flush=True)
    table = format_table(rows)
    if len(args.forms) > 1:
        table += "\n\n" + format_forms(rows, args.forms)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
