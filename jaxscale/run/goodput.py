"""Goodput: every second of a run's wall time in one bucket, across restarts.

    jaxscale goodput WORKDIR [--out PNG]

One process start is one *segment*. While it runs, its `Ledger` splits the host wall-clock
(never the device: nothing here waits on an array) into startup/compile, productive steps,
evaluation, blocking checkpoint time (restore, and the loop waiting on saves) and data wait (the
loop blocked in the input pipeline); productive is what is left, so a segment's buckets sum to
its wall time exactly. Two more buckets come from comparing segments (`account`): lost work (the
steps a later segment recomputed after restoring an earlier checkpoint, at the time the
segment that threw them away measured for them) and restart gaps (from a segment's last
heartbeat to the next one's process start).

On disk (process 0 only), both crash-safe:

- `<workdir>/goodput.segment.json`: the running segment's record, rewritten whole (tmp file +
  rename) at every log and checkpoint step and every few seconds from a timer thread: the
  heartbeat a kill -9 leaves behind.
- `<workdir>/goodput.jsonl`: append-only, one finished segment per line (a line is written in
  one call; a line a crash cut short does not parse and is skipped). A segment ends there with
  its status (`done`, `preempted`, `failed`); the next start appends a heartbeat left behind
  as `killed` (once: records carry an id), then replaces the heartbeat file with its own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from jaxscale.errors import ConfigError

# Bucket -> label, in the order tables and bars show them; "productive" is the goodput.
BUCKETS = {
    "startup": "startup/compile", "productive": "productive", "evaluation": "evaluation",
    "checkpoint": "checkpoint", "data_wait": "data wait", "lost": "lost work",
    "restart_gap": "restart gap",
}
# The table's column of each bucket (docs/metrics.md has the legend).
COLUMNS = {"startup": "startup", "productive": "productive", "evaluation": "eval",
           "checkpoint": "ckpt", "data_wait": "data", "lost": "lost", "restart_gap": "gap"}
# What a Ledger times itself; the rest are derived across segments.
SPANS = ("evaluation", "checkpoint", "data_wait")
LOG, HEARTBEAT = "goodput.jsonl", "goodput.segment.json"
HEARTBEAT_S = 5.0  # the timer thread's heartbeat interval
MARKS_KEPT = 64  # checkpoint steps whose productive seconds a record keeps (restore points)


_now = time.perf_counter  # the ledger's clock (a module attribute: tests swap it)


_first_segment = [True]  # the process's first ledger starts at the process's start


def process_start(since: float | None = None) -> tuple[float, float]:
    """(time.time(), _now()) where this process's segment began: for its first ledger the
    process's start (Linux: /proc, to 10 ms, so the interpreter's and jax's imports are startup
    too; elsewhere `since`), for a later one (train() called again in-process) `since`."""
    wall, mono = time.time(), _now()
    since = mono if since is None else since
    first, _first_segment[0] = _first_segment[0], False
    if not first:
        return wall - (mono - since), since
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = pathlib.Path("/proc/self/stat").read_text()
        started = int(stat.rpartition(")")[2].split()[19]) / ticks  # field 22: starttime
        age = float(pathlib.Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return wall - (mono - since), since
    age = min(max(age, 0.0), mono)  # never before this clock's own zero
    return wall - age, mono - age


class Ledger:
    """The running segment's buckets, from host wall-clock only.

    Usage (`jaxscale.run.loop.train` does this)::

        ledger = Ledger(workdir, enabled=process_index == 0, since=entry_time)
        with ledger.span("checkpoint"):
            state = restore()
        ledger.open(start_step)       # appends a killed predecessor; first heartbeat
        ...                           # compile (startup)
        ledger.begin_steps()          # startup ends at the first dispatch
        ledger.step(n, heartbeat=...) # after each step; ledger.mark(n) after saving step n
        ledger.finish("done")         # -> account() over every segment
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 since: float | None = None):
        """`since`: `_now()` when the segment's work began, if not at the process's start."""
        self.workdir, self.enabled = pathlib.Path(workdir), enabled
        self.wall0, self.mono0 = process_start(since)
        self.id = uuid.uuid4().hex[:12]
        self.spans = dict.fromkeys(SPANS, 0.0)
        self.startup_s: float | None = None  # fixed by begin_steps
        self.start_step = self.last_step = 0
        self.marks: dict[int, float] = {}
        self.step_s: collections.deque[float] = collections.deque(maxlen=256)
        self._last = (0, 0.0)  # (step, productive seconds) at the previous step()
        self._open: tuple[str, float] | None = None  # the span in progress, since when
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.finished = False

    # -- timing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, bucket: str) -> Iterator[None]:
        """Time the block into `bucket` (one of SPANS)."""
        start = _now()
        self._open = (bucket, start)
        try:
            yield
        finally:
            with self._lock:
                self._open = None
                self.spans[bucket] += _now() - start

    def buckets(self) -> dict[str, float]:
        """The segment's seconds so far: startup, productive and SPANS; they sum to its age."""
        now = _now()
        spans = dict(self.spans)
        if self._open is not None:  # a heartbeat inside a span counts its time so far
            spans[self._open[0]] += now - self._open[1]
        elapsed = now - self.mono0
        if self.startup_s is None:
            return {"startup": elapsed - sum(spans.values()), "productive": 0.0, **spans}
        return {"startup": self.startup_s,
                "productive": elapsed - self.startup_s - sum(spans.values()), **spans}

    def begin_steps(self) -> None:
        """Startup ends: the first step is about to be dispatched."""
        self.startup_s = self.buckets()["startup"]

    def step(self, step: int, *, heartbeat: bool = False) -> None:
        """`step` steps are dispatched (host time only: nothing waits on the device here)."""
        productive = self.buckets()["productive"]
        last_step, last_s = self._last
        with self._lock:  # (the timer thread's heartbeat reads step_s)
            if step > last_step:
                self.step_s.append((productive - last_s) / (step - last_step))
            self._last, self.last_step = (step, productive), step
        if heartbeat:
            self.heartbeat()

    def mark(self, step: int) -> None:
        """Step `step` was saved: remember its productive seconds (a later restart that
        restores it loses only what came after), and heartbeat."""
        with self._lock:
            self.marks[step] = self.buckets()["productive"]
            while len(self.marks) > MARKS_KEPT:
                del self.marks[min(self.marks)]
        self.heartbeat()

    def record(self, status: str = "running") -> dict[str, Any]:
        """The segment as a JSON-ready record (the heartbeat's and goodput.jsonl's lines); the
        caller holds the lock (or no other thread runs)."""
        buckets = self.buckets()
        return {
            "segment": self.id, "status": status, "pid": os.getpid(), "start": self.wall0,
            "end": self.wall0 + _now() - self.mono0,
            "start_step": self.start_step, "last_step": self.last_step,
            **{f"{k}_s": v for k, v in buckets.items()},
            "median_step_s": statistics.median(self.step_s) if self.step_s else None,
            "marks": {str(k): v for k, v in sorted(self.marks.items())},
        }

    # -- files ---------------------------------------------------------------------------------

    def open(self, start_step: int) -> None:
        """The segment begins at `start_step`: append a predecessor's heartbeat that never
        finished (as `killed`), write this one's first heartbeat and start the timer thread."""
        self.start_step = self.last_step = start_step
        self._last = (start_step, 0.0)
        self.marks[start_step] = 0.0
        if not self.enabled:
            return
        left = _read_heartbeat(self.workdir / HEARTBEAT)
        if left is not None:
            log = self.workdir / LOG
            done = {r.get("segment") for r in read_jsonl(log)} if log.exists() else set()
            if left.get("segment") not in done:
                append_line(log, {**left, "status": "killed"})
        self.heartbeat()
        threading.Thread(target=self._beat, name="goodput-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Rewrite goodput.segment.json whole (tmp + rename)."""
        if not self.enabled or self.finished:
            return
        with self._lock:
            if not self.finished:  # (the timer may wake after finish)
                _write_atomic(self.workdir / HEARTBEAT, json.dumps(self.record()) + "\n")

    def finish(self, status: str) -> dict[str, Any]:
        """End the segment: append its record to goodput.jsonl, drop the heartbeat file; return
        `account` of every segment so far (this one's record included, on every process)."""
        self._stop.set()
        with self._lock:
            record = self.record(status)
        if self.finished:
            return account([record])
        records = ([r for r in read_segments(self.workdir) if r.get("segment") != self.id]
                   if self.enabled else [])
        with self._lock:
            self.finished = True
            if self.enabled:
                append_line(self.workdir / LOG, record)
                (self.workdir / HEARTBEAT).unlink(missing_ok=True)
        return account([*records, record])

    def discard(self) -> None:
        """Nothing to train: forget the segment (its heartbeat file goes)."""
        self._stop.set()
        with self._lock:
            self.finished = True
            if self.enabled:
                (self.workdir / HEARTBEAT).unlink(missing_ok=True)

    def exit(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """An ExitStack callback: a segment that ends by an exception ends `preempted` (a stop
        signal) or `failed`."""
        from jaxscale.errors import Preempted

        if not self.finished:
            self.finish("preempted" if isinstance(exc, Preempted) else
                        "failed" if exc is not None else "done")


class TimedIterator:
    """An iterator whose `next` counts as data wait; every other attribute is the wrapped
    iterator's (`get_state`, `step`, ...)."""

    def __init__(self, inner: Any, ledger: Ledger):
        self._inner, self._ledger = inner, ledger

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        with self._ledger.span("data_wait"):
            return next(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def append_line(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Append one JSON line in one write (after a newline if a crash left a line unfinished)."""
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, skipping a line a crash cut short (as
    `analysis.metrics.read_jsonl`, without importing jax for the CLI)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _read_heartbeat(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none, or (never, being renamed whole) unreadable
        return None


def read_segments(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every segment of a workdir in order: goodput.jsonl's, then a heartbeat not in it yet
    (a running segment, or a killed one no start has appended)."""
    workdir = pathlib.Path(workdir)
    records = read_jsonl(workdir / LOG) if (workdir / LOG).exists() else []
    left = _read_heartbeat(workdir / HEARTBEAT)
    if left is not None and left.get("segment") not in {r.get("segment") for r in records}:
        records.append(left)
    return records


# -- accounting --------------------------------------------------------------------------------


def lost_seconds(record: dict[str, Any], kept_to: int) -> float:
    """Productive seconds of `record`'s steps after `kept_to` (the rest it did are kept): from
    its mark at that step, else at its median step time; never more than its productive time."""
    steps = record["last_step"] - kept_to
    if steps <= 0:
        return 0.0
    productive = record["productive_s"]
    mark = record.get("marks", {}).get(str(kept_to))
    if mark is not None:
        lost = productive - mark
    else:
        lost = steps * (record.get("median_step_s") or 0.0)
    return min(max(lost, 0.0), productive)


def account(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum segments into buckets.

    A step done by segment i is lost when a later segment restored an earlier step (its
    `start_step`) and so did it again: segment i keeps its steps up to min(start_step of every
    later segment); its productive seconds after that move to `lost`. A restart gap precedes a
    segment whose predecessor did not finish its run (`done`): from that one's last heartbeat
    (`end`) to this one's process start.

    Returns:
      {"segments": [per segment: id, status, steps "a-b", every bucket in seconds, total_s],
       "total": {every bucket, total_s, fraction (productive / total), segments (a count)}}.
    """
    rows = []
    for i, r in enumerate(records):
        kept_to = min([r["last_step"], *(later["start_step"] for later in records[i + 1:])])
        lost = lost_seconds(r, kept_to)
        previous = records[i - 1] if i else None
        gap = (max(r["start"] - previous["end"], 0.0)
               if previous is not None and previous.get("status") != "done" else 0.0)
        row = {k: r.get(f"{k}_s", 0.0) for k in BUCKETS}
        row.update(productive=row["productive"] - lost, lost=lost, restart_gap=gap)
        rows.append({"segment": r.get("segment"), "status": r.get("status"),
                     "steps": f"{r['start_step']}-{r['last_step']}", **row,
                     "total_s": sum(row.values())})
    total = {k: sum(row[k] for row in rows) for k in BUCKETS}
    total_s = sum(total.values())
    total.update(total_s=total_s, fraction=total["productive"] / total_s if total_s else 0.0,
                 segments=len(rows))
    return {"segments": rows, "total": total}


def summary(acc: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `goodput` object: `<bucket>_s` seconds, total_s, fraction, segments."""
    t = acc["total"]
    return {**{f"{k}_s": t[k] for k in BUCKETS}, "total_s": t["total_s"],
            "fraction": t["fraction"], "segments": t["segments"]}


def headline(acc: dict[str, Any]) -> str:
    """e.g. ``goodput 83.1% (largest loss: startup/compile 9.2 s)``."""
    t = acc["total"]
    losses = {k: t[k] for k in BUCKETS if k != "productive"}
    worst = max(losses, key=losses.get)
    return f"goodput {100 * t['fraction']:.1f}% (largest loss: {BUCKETS[worst]} {t[worst]:.1f} s)"


def format_table(acc: dict[str, Any]) -> str:
    """One row per segment and a total row, seconds per bucket, then the headline."""
    names = ["segment", "status", "steps", *COLUMNS.values(), "total"]
    rows = [[str(i), r["status"], r["steps"], *(f"{r[k]:.1f}" for k in BUCKETS),
             f"{r['total_s']:.1f}"] for i, r in enumerate(acc["segments"])]
    t = acc["total"]
    rows.append(["total", "", "", *(f"{t[k]:.1f}" for k in BUCKETS), f"{t['total_s']:.1f}"])
    rows.append(["share", "", "", *(f"{100 * t[k] / (t['total_s'] or 1):.1f}%" for k in BUCKETS),
                 "100.0%"])
    widths = [max(len(x) for x in col) for col in zip(names, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in [names, *rows]]
    return "\n".join([*lines, headline(acc)])


def plot(acc: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """A stacked bar per segment (and the total) of the buckets, to `path` (written whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxscale.analysis.plot import save_figure

    bars = [*(r for r in acc["segments"]), acc["total"]]
    labels = [*(str(i) for i in range(len(acc["segments"]))), "total"]
    fig, ax = plt.subplots(figsize=(1.2 * len(bars) + 4, 4))
    bottom = [0.0] * len(bars)
    for key, label in BUCKETS.items():
        heights = [b[key] for b in bars]
        ax.bar(labels, heights, bottom=bottom, label=label)
        bottom = [x + h for x, h in zip(bottom, heights, strict=True)]
    ax.set(xlabel="segment", ylabel="seconds", title=headline(acc))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, path)


# -- `jaxscale goodput` ------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the `goodput` subcommand to the main CLI's subparsers."""
    p = sub.add_parser("goodput", help="where a run's wall time went, across restarts",
                       description="Per segment (process start) and in total: seconds of "
                                   "startup/compile, productive steps, evaluation, checkpoint, "
                                   "data wait, lost work and restart gaps.")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/goodput.png)")
    p.set_defaults(func=cmd_goodput, parser=p)
    return p


def cmd_goodput(args: argparse.Namespace) -> int:
    """`jaxscale goodput`: print the table, write the bar chart."""
    workdir = pathlib.Path(args.workdir)
    records = read_segments(workdir)
    if not records:
        raise ConfigError(f"{workdir} has no {LOG} (jaxscale train writes it into its workdir)")
    acc = account(records)
    print(format_table(acc))
    try:
        print(f"plot: {plot(acc, pathlib.Path(args.out or workdir / 'goodput.png'))}")
    except ImportError:
        print("plot: skipped (pip install 'jaxscale[plot]' for matplotlib)")
    return 0
