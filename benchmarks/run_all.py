"""Run the CPU benchmark suite and write its tables into benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # the full suite (about an hour on a 2-core machine)
    python benchmarks/run_all.py --quick    # smaller models and fewer steps (a smoke run)
    python benchmarks/run_all.py --only remat_policies mesh_strategies

Each benchmark runs in its own process (each sets up its 8 simulated CPU devices before jax
starts) and can be run alone with the command shown in its section. The suite's section of
RESULTS.md lies between the two marker comments and is replaced on every run; the rest of the
file (other benchmarks, the GPU results) is left as it is. The GPU benchmark needs a GPU and runs
separately: scripts/gpu_benchmark.sh.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN = "<!-- run_all.py: begin (generated; edits between these markers are overwritten) -->"
END = "<!-- run_all.py: end -->"

# name -> (title, arguments of the full run, arguments of --quick, what the numbers mean)
BENCHMARKS = {
    "step_overhead": (
        "Framework overhead: jaxscale step vs a hand-written jax.jit step",
        ["--steps", "20"], ["--steps", "10", "--layers", "2", "--d-model", "128"],
        "Same model, mesh (fsdp=8), shardings, optimizer and donation on both sides; ratio = "
        "hand-written median step time / jaxscale median step time (>= 0.98 means jaxscale "
        "costs nothing)."),
    "remat_policies": (
        "Remat policies: step time and activation memory", [], ["--quick"],
        "Activations+temps are XLA's temp buffers of the compiled step; the CPU has no fused "
        "attention, so every policy that recomputes attention pays for it here."),
    "mesh_strategies": (
        "Mesh strategies on 8 simulated devices: step time and bytes per device", [], ["--quick"],
        "On the CPU the 8 devices share 2 cores and collectives are memory copies, so the time "
        "column ranks the layouts' compute + copy volume, not network behaviour; the bytes are "
        "exact."),
    "sparse_and_long": (
        "Expert and context parallelism vs FSDP: step time and bytes per device", [], ["--quick"],
        "Same model per table, 8 simulated devices. The CPU has no grouped-matmul kernel: "
        "ragged_dot runs as dense work there, so dropless rows are slow on the CPU; temps of the "
        "dropless expert-parallel rows include the worst-case exchange buffers."),
    "pipeline_schedules": (
        "Pipeline schedules vs FSDP: step time, bubble and bytes per device", [], ["--quick"],
        "Same model and global batch on every row, 8 simulated devices. The 8 devices share the "
        "CPU's cores, so a pipelined step's time is its total work, not its overlap: a stage's "
        "idle ticks (the bubble) are filled with other devices' work here, while an accelerator "
        "would wait through them."),
    "scan_vs_unrolled": (
        "Scanned vs unrolled layers: compile time and step time", [], ["--quick"],
        "Compile time grows with the number of layers only when they are unrolled."),
    "generate_decode": (
        "Generation: prefill and decode throughput", [], ["--quick"],
        "Greedy decoding with a key/value cache (`jaxscale.generate.Generator`), random "
        "parameters, float32, compilation excluded. The 8 simulated devices share 2 cores, so "
        "compare rows within the table, not with an accelerator. Decode is bound by memory and "
        "latency per step (every step reads all the parameters and the cache for one token per "
        "row), so more prompts per call raise tokens/s at nearly the same time per step; "
        "prefill processes all prompt tokens in one pass and runs many times more tokens/s. A "
        "batch is padded to a multiple of the mesh's batch devices (\"rows run\")."),
    "vision_throughput": (
        "Vision: images/s and MFU of the digits presets per mesh", [], ["--quick"],
        "resnet-digits and vit-digits as shipped (16x16 digits, batch 72, float32), each "
        "mesh a compiled jaxscale step timed round-robin. MFU counts the model's own FLOPs "
        "per image (6 x forward multiply-accumulates) against the CPU's measured matmul peak; "
        "these models are small (a few MFLOPs per image), so per-op overhead, not arithmetic, "
        "sets their speed on the CPU."),
}


def run(name: str, args: list[str]) -> tuple[str, float, int]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each benchmark sets its own device count
    env.pop("JAX_PLATFORMS", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], cwd=HERE,
                          capture_output=True, text=True, env=env)
    out = proc.stdout if proc.returncode == 0 else proc.stdout + "\n" + proc.stderr[-3000:]
    return out.strip(), time.perf_counter() - start, proc.returncode


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def section(results: dict[str, tuple[str, float, int, list[str]]], quick: bool,
            loads: list[float]) -> str:
    lines = [BEGIN, "## CPU benchmark suite (`benchmarks/run_all.py`)", "",
             f"Run {datetime.date.today().isoformat()} with `python benchmarks/run_all.py"
             f"{' --quick' if quick else ''}` on {os.cpu_count()} CPU cores "
             f"({platform.machine()}, Python {platform.python_version()}), 8 simulated devices; "
             f"1-minute load average between {min(loads):.1f} and {max(loads):.1f} (sampled "
             "before and after each benchmark). The machine is shared: absolute times "
             "move between runs, compare within a table (each table is measured in one run, "
             "its rows alternated).", ""]
    for name, (out, seconds, code, args) in results.items():
        title, _, _, note = BENCHMARKS[name]
        command = " ".join(["python", f"benchmarks/{name}.py", *args])
        lines += [f"### {title}", "", f"```bash\n{command}\n```", "", note, ""]
        if code != 0:
            lines += [f"FAILED (exit {code}):", "", "```", out[-3000:], "```", ""]
            continue
        if name == "step_overhead":
            ratio = re.findall(r"^ratio: ([0-9.]+)$", out, flags=re.M)
            lines += ["```", out, "```", "",
                      f"**ratio: {ratio[-1] if ratio else '?'}** ({seconds:.0f} s)", ""]
        else:
            lines += [out, "", f"({seconds:.0f} s)", ""]
    lines.append(END)
    return "\n".join(lines)


def write(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller models, fewer steps")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args(argv)
    results, loads = {}, [_load()]
    for name in args.only:
        extra = BENCHMARKS[name][2] if args.quick else BENCHMARKS[name][1]
        print(f"running {name} {' '.join(extra)} ...", flush=True)
        out, seconds, code = run(name, extra)
        print(out + f"\n({seconds:.0f} s, exit {code})\n", flush=True)
        results[name] = (out, seconds, code, extra)
        loads.append(_load())
    text = section(results, args.quick, loads)
    if not args.no_write:
        write(text)
        print(f"wrote {RESULTS}")
    return 0 if all(r[2] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
