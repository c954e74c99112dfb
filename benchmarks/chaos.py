"""Chaos soak: a supervisor restarts a run after random faults until it finishes, then checks that
nothing was lost or repeated in the result and that goodput accounted for the lost time.

One uninterrupted reference run of the tiny preset (shrunk: 1 layer, d_model 32, 16 tokens x 8
rows; `--steps` steps, a checkpoint every `--every`), then the chaos run in another workdir: start,
inject a fault, restart from the newest checkpoint, until the run exits 0. Three kinds of fault,
drawn at random (`--seed`), `--faults` of them:

* kill: kill -9 once this start has taken the batch of a chosen step (past the step it resumed
  from, so after startup), then a random 0..`--jitter` s more (the step is drawn so the faults
  spread over the run);
* term: SIGTERM at such a moment (the run saves at its stop step and exits with
  EXIT_PREEMPTED);
* fail_save: the background write of one of the next two checkpoint steps fails
  (JAXSCALE_TEST_FAIL_SAVE; the run exits with EXIT_CHECKPOINT at its next save).

Every start goes through tests/resume_harness.py (the `jaxscale` command plus test hooks: a batch
log of each step's sha256, a delay per batch so the faults land mid-run) and shares a persistent
compilation cache, so restarts load their programs instead of compiling them.

At the end it checks, and exits 1 if any check fails:

* the final parameters and optimizer state are bitwise equal to the reference's final step;
* every step's batch has the reference's sha256 for that step, every start's batches run
  consecutively from the step it resumed, and no step is missing (repeats after a restart are
  expected and counted);
* `jaxscale goodput WORKDIR`'s buckets sum to its total (within 1%), it saw every start, and
  lost work is above 0.

It prints the goodput table and a summary line, and writes the result as JSON to
benchmarks/results/chaos-<date>.json (`--out` to choose).

    python benchmarks/chaos.py                    # 20 faults on a 150-step run
    python benchmarks/chaos.py --faults 5 --seed 1 --steps 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "resume_harness.py"
SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=8", "eval_every=0", "log_every=1",
         "progress=false", "optim.warmup_steps=2"]
KINDS = ("kill", "term", "fail_save")
EXIT_PREEMPTED, EXIT_CHECKPOINT = 4, 6  # jaxscale.cli's codes (checked against it in main)
EXPECTED = {"kill": -signal.SIGKILL, "term": EXIT_PREEMPTED, "fail_save": EXIT_CHECKPOINT}
TIMEOUT = 600  # seconds one start may take before the supervisor gives up on it


def make_corpus(path: pathlib.Path) -> pathlib.Path:
    """The resume tests' corpus: jaxscale's own source files, one document each (made once,
    renamed into place whole)."""
    if not path.exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        for i, source in enumerate(sorted((ROOT / "jaxscale").rglob("*.py"))):
            (tmp / f"doc{i:03d}.txt").write_text(source.read_text())
        tmp.rename(path)
    return path


class Setup:
    """What every start of both runs shares: corpus, compilation cache, overrides, devices."""

    def __init__(self, corpus, cache, *, steps: int, every: int, devices: int = 1,
                 overrides=()):
        self.corpus, self.cache = str(corpus), str(cache)
        self.steps, self.every, self.devices = steps, every, devices
        self.overrides = [*SMALL, f"steps={steps}", f"optim.decay_steps={steps}",
                          f"checkpoint.every={every}", "checkpoint.keep=100000", *overrides]

    def start(self, workdir, batch_log, out, **hooks) -> subprocess.Popen:
        """One `jaxscale train` through the harness, its output to the file `out`."""
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(JAX_COMPILATION_CACHE_DIR=self.cache, PYTHONUNBUFFERED="1",
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                   JAXSCALE_TEST_BATCH_LOG=str(batch_log), JAXSCALE_TEST_NO_PLOT="1")
        env.update({f"JAXSCALE_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
        return subprocess.Popen(
            [sys.executable, str(HARNESS), "train", "--config", "tiny", "--cpu-devices",
             str(self.devices), *self.overrides, f"workdir={workdir}",
             f"data.path={self.corpus}"],
            stdout=out, stderr=subprocess.STDOUT, env=env)


def read_batches(path) -> list[tuple[int, str]]:
    """A batch log's (step, sha256) rows; a row a kill cut short is left out."""
    path = pathlib.Path(path)
    rows = [line.split() for line in (path.read_text() if path.exists() else "").splitlines()]
    return [(int(r[0]), r[1]) for r in rows if len(r) == 2 and len(r[1]) == 64]


def committed_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _last_taken_step(batch_log: pathlib.Path) -> int:
    """The step of this start's newest batch (-1 before its first). Its own batch log, not
    metrics.jsonl: a resume rewrites that without the steps after the restored one."""
    batches = read_batches(batch_log)
    return batches[-1][0] if batches else -1


def reference_run(setup: Setup, workdir: pathlib.Path) -> list[tuple[int, str]]:
    """The uninterrupted run; returns its batch log."""
    batch_log = workdir.with_name(f"{workdir.name}.batches")
    with open(workdir.with_name(f"{workdir.name}.out"), "w+") as out:
        proc = setup.start(workdir, batch_log, out)
        code = proc.wait(timeout=TIMEOUT)
        if code != 0:
            out.seek(0)
            raise RuntimeError(f"the reference run exited {code}:\n{out.read()[-3000:]}")
    return read_batches(batch_log)


def draw_kinds(count: int, seed: int) -> list[str]:
    """`count` fault kinds drawn uniformly (the same for a seed)."""
    rng = random.Random(seed)
    return [rng.choice(KINDS) for _ in range(count)]


def chaos_run(setup: Setup, workdir: pathlib.Path, kinds, *, seed: int = 0,
              jitter_s: float = 0.3, batch_delay: float = 0.1, log=print) -> dict:
    """Start the run, inject `kinds`' faults one a start, restart until it exits 0.

    A signal (kill, term) lands once this start has taken the batch of a step drawn from just past
    the step it resumed to a share of the steps left (so later faults still find steps to land
    in), then a random 0..jitter_s more. A write failure takes one of the next two checkpoint
    steps; where none is left before the last save, the fault becomes a kill.

    Returns {"segments": [per start: kind, start_step, code, seconds, batches, fail_step or
    signal_step], "wall_s": first start to the last exit, "missed": faults that never landed}.
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    segments, pending, missed = [], list(kinds), []
    wall_start = time.monotonic()
    while True:
        n = len(segments)
        start = max(committed_steps(workdir), default=0)
        kind = pending.pop(0) if pending else None
        hooks, seg = {}, {"kind": kind, "start_step": start}
        if kind == "fail_save":
            upcoming = [s for s in range(start // setup.every * setup.every + setup.every,
                                         setup.steps - setup.every + 1, setup.every)][:2]
            if upcoming:
                hooks["fail_save"] = seg["fail_step"] = rng.choice(upcoming)
            else:
                kind = seg["kind"] = "kill"
        if kind in ("kill", "term"):
            span = max(1, (setup.steps - 10 - start) // (2 * len(pending) + 2))
            seg["signal_step"] = min(start + rng.randint(1, span), setup.steps - 3)
            seg["jitter_s"] = round(rng.uniform(0, jitter_s), 3)
        batch_log = workdir.with_name(f"{workdir.name}.batches.{n}")
        t0 = time.monotonic()
        with open(workdir.with_name(f"{workdir.name}.out.{n}"), "w+") as out:
            proc = setup.start(workdir, batch_log, out, batch_delay=batch_delay, **hooks)
            if kind in ("kill", "term"):
                while proc.poll() is None and _last_taken_step(batch_log) < seg["signal_step"]:
                    if time.monotonic() - t0 > TIMEOUT:
                        proc.kill()
                        break
                    time.sleep(0.02)
                time.sleep(seg["jitter_s"])
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
            try:
                code = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            out.seek(0)
            output = out.read()
        resumed = re.search(r"checkpoint: resumed from step (\d+)", output)
        # The step it resumed from (an unverified newest step is skipped for the one before).
        seg.update(start_step=int(resumed.group(1)) if resumed else 0, code=code,
                   seconds=round(time.monotonic() - t0, 2), batches=read_batches(batch_log))
        segments.append(seg)
        taken = [s for s, _ in seg["batches"]]
        log(f"start {n}: from step {seg['start_step']}, {kind or 'no fault'}"
            + (f" at step {seg['fail_step']}" if "fail_step" in seg else "")
            + (f" after step {seg['signal_step']} + {seg['jitter_s']} s" if "signal_step" in seg
               else "")
            + f": exit {code}, batches {taken[0] if taken else '-'}..{taken[-1] if taken else '-'}"
            + f", {seg['seconds']:.1f} s")
        if kind is None or code == 0:
            if kind is not None:
                missed.append(kind)  # the run finished before the fault landed
                missed.extend(pending)
            if code != 0:
                raise RuntimeError(f"the last start exited {code}:\n{output[-3000:]}")
            break
        if code != EXPECTED[kind]:
            raise RuntimeError(f"start {n} ({kind}) exited {code}, not {EXPECTED[kind]}:\n"
                               f"{output[-3000:]}")
    return {"segments": segments, "wall_s": time.monotonic() - wall_start, "missed": missed}


def check_batches(reference: list[tuple[int, str]], segments: list[dict], steps: int) -> dict:
    """Compare every start's batches with the reference's; returns {"errors": [...], "taken":
    batches taken in all, "repeated": taken beyond one per step}."""
    errors = []
    if [s for s, _ in reference] != list(range(steps)):
        errors.append(f"the reference's batch log is not steps 0..{steps - 1}")
    want = dict(reference)
    seen, taken = set(), 0
    for n, seg in enumerate(segments):
        got = seg["batches"]
        taken += len(got)
        if [s for s, _ in got] != list(range(seg["start_step"], seg["start_step"] + len(got))):
            errors.append(f"start {n}: batches are not consecutive from step {seg['start_step']}:"
                          f" {[s for s, _ in got][:5]}...")
        bad = [s for s, h in got if want.get(s) != h]
        if bad:
            errors.append(f"start {n}: batches of steps {bad[:5]} differ from the reference's")
        seen.update(s for s, _ in got)
    missing = sorted(set(range(steps)) - seen)
    if missing:
        errors.append(f"steps {missing[:10]} never took a batch")
    extra = sorted(seen - set(range(steps)))
    if extra:
        errors.append(f"steps {extra[:10]} are beyond the run's {steps}")
    return {"errors": errors, "taken": taken, "repeated": taken - len(seen)}


def check_state(reference_dir, chaos_dir) -> dict:
    """Bitwise comparison of two saved states (parameters, optimizer state, counters)."""
    import numpy as np

    sys.path.insert(0, str(HARNESS.parent))
    import resume_harness

    a, b = resume_harness.read_state(reference_dir), resume_harness.read_state(chaos_dir)
    errors = []
    if a.keys() != b.keys():
        errors.append(f"state keys differ: {sorted(set(a) ^ set(b))[:5]}")
    differ = [k for k in a.keys() & b.keys()
              if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    if differ:
        errors.append(f"{len(differ)} arrays differ from the reference's: {sorted(differ)[:3]}")
    return {"errors": errors, "arrays": len(a), "numbers": int(sum(x.size for x in a.values()))}


def check_goodput(workdir, segments: int, wall_s: float) -> dict:
    """`jaxscale goodput WORKDIR` (a subprocess) and summary.json's goodput: buckets sum to the
    total within 1%, every start is a segment, lost work above 0."""
    proc = subprocess.run([sys.executable, "-m", "jaxscale.cli", "goodput", str(workdir),
                           "--out", str(pathlib.Path(workdir) / "goodput.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    errors = [] if proc.returncode == 0 else [f"jaxscale goodput exited {proc.returncode}: "
                                             f"{proc.stderr[-500:]}"]
    summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())["goodput"]
    buckets = {k[:-2]: v for k, v in summary.items() if k.endswith("_s") and k != "total_s"}
    total = summary["total_s"]
    if abs(sum(buckets.values()) - total) > 0.01 * total:
        errors.append(f"goodput buckets sum to {sum(buckets.values()):.2f} s, not {total:.2f} s")
    if summary["segments"] != segments:
        errors.append(f"goodput counted {summary['segments']} segments, not {segments} starts")
    if not buckets.get("lost", 0) > 0:
        errors.append("goodput reports no lost work after the faults")
    return {"errors": errors, "table": proc.stdout.strip(), "buckets": buckets, "total_s": total,
            "fraction": summary["fraction"], "wall_ratio": total / wall_s if wall_s else 0.0}


def soak(root: pathlib.Path, kinds, *, steps: int, every: int, seed: int = 0, devices: int = 1,
         cache=None, corpus=None, jitter_s: float = 0.3, batch_delay: float = 0.1,
         log=print) -> dict:
    """The reference run, the chaos run and every check; returns the result (errors under
    "errors", empty when everything holds)."""
    root = pathlib.Path(root)
    setup = Setup(corpus or make_corpus(root / "corpus"), cache or root / "jax_cache",
                  steps=steps, every=every, devices=devices)
    pathlib.Path(setup.cache).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    reference = reference_run(setup, root / "reference")
    log(f"reference: {steps} steps in {time.monotonic() - t0:.1f} s")
    chaos = chaos_run(setup, root / "chaos", kinds, seed=seed, jitter_s=jitter_s,
                      batch_delay=batch_delay, log=log)
    segments = chaos["segments"]
    batches = check_batches(reference, segments, steps)
    state = check_state(root / "reference" / "checkpoints" / str(steps),
                        root / "chaos" / "checkpoints" / str(steps))
    goodput = check_goodput(root / "chaos", len(segments), chaos["wall_s"])
    faults = {k: sum(s["kind"] == k for s in segments) for k in KINDS}
    errors = batches["errors"] + state["errors"] + goodput["errors"]
    if chaos["missed"]:
        errors.append(f"faults that never landed (the run finished first): {chaos['missed']}")
    return {"steps": steps, "every": every, "seed": seed, "devices": devices, "faults": faults,
            "restarts": len(segments) - 1, "wall_s": round(chaos["wall_s"], 2),
            "batches_taken": batches["taken"], "batches_repeated": batches["repeated"],
            "state_arrays": state["arrays"], "state_numbers": state["numbers"],
            "goodput": {k: goodput[k] for k in ("buckets", "total_s", "fraction", "wall_ratio")},
            "goodput_table": goodput["table"],
            "segments": [{k: v for k, v in s.items() if k != "batches"} | {
                "batches": len(s["batches"])} for s in segments],
            "errors": errors}


def summary_line(result: dict) -> str:
    f = result["faults"]
    return (f"chaos: {sum(f.values())} faults ({f['kill']} kill -9, {f['term']} SIGTERM, "
            f"{f['fail_save']} write failures), {result['restarts']} restarts, "
            f"{result['batches_repeated']} batches repeated, {result['wall_s']:.1f} s wall, "
            f"goodput {100 * result['goodput']['fraction']:.1f}%, "
            f"lost work {result['goodput']['buckets']['lost']:.1f} s: "
            + ("final state bitwise equal to the reference, every batch the reference's"
               if not result["errors"] else "FAILED"))


def _write_json(path: pathlib.Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    p.add_argument("--seed", type=int, default=0, help="draws the kinds, steps and delays")
    p.add_argument("--steps", type=int, default=150, help="steps of the run (default 150)")
    p.add_argument("--every", type=int, default=10, help="checkpoint.every (default 10)")
    p.add_argument("--cpu-devices", type=int, default=1, help="simulated CPU devices per run")
    p.add_argument("--jitter", type=float, default=0.3,
                   help="a signal lands up to this many seconds after its step (default 0.3)")
    p.add_argument("--batch-delay", type=float, default=0.1,
                   help="seconds each batch is held back, so faults land mid-run (default 0.1)")
    p.add_argument("--dir", default=None, help="where the runs go (default: a temp dir)")
    p.add_argument("--out", default=None,
                   help="result JSON (default: benchmarks/results/chaos-<date>.json)")
    args = p.parse_args(argv)
    from jaxscale import cli

    assert (cli.EXIT_PREEMPTED, cli.EXIT_CHECKPOINT) == (EXIT_PREEMPTED, EXIT_CHECKPOINT)
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process reads the two final states only
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="jaxscale-chaos-"))
    kinds = draw_kinds(args.faults, args.seed)
    print(f"chaos: {args.steps} steps, checkpoint every {args.every}, {args.faults} faults "
          f"(seed {args.seed}) in {root}", flush=True)
    result = soak(root, kinds, steps=args.steps, every=args.every, seed=args.seed,
                  devices=args.cpu_devices, jitter_s=args.jitter, batch_delay=args.batch_delay,
                  log=lambda line: print(line, flush=True))
    print(result["goodput_table"])
    print(f"goodput total {result['goodput']['total_s']:.1f} s = "
          f"{100 * result['goodput']['wall_ratio']:.1f}% of the supervisor's wall time")
    for error in result["errors"]:
        print(f"FAIL: {error}")
    print(summary_line(result))
    date = datetime.date.today().isoformat()
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"chaos-{date}.json")
    _write_json(out, {"date": date, "command": " ".join(["python benchmarks/chaos.py",
                                                         *(argv or sys.argv[1:])]), **result})
    print(f"result: {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
