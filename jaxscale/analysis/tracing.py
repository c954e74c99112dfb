"""Read a jax.profiler trace back: where did the device time go?

`train` captures traces with `profile.steps=[start,stop]` (into `<workdir>/profile`); TensorBoard's
profile plugin or Perfetto show them (docs/profiling.md). `summarize_trace` turns one into
numbers without a viewer: device time per category of kernel (matmul, attention, collective,
copy, other fusions) and the idle gaps between kernels, which is what decides MFU.

Kernels are classified by their name and the HLO op that launched them (the `CATEGORIES` table,
first match wins). On a GPU the kernel events are the trace's per-stream lines; on the CPU, where
there are no streams, the thunks that carry an `hlo_op`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterable

# category -> regex searched in "<kernel name> <hlo op>" (lower case); first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("collective", r"nccl|all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"),
    ("attention", r"fmha|flash|cudnn|sdpa|attention"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|\bdot\b|dot[._]|matmul|wgmma|hgmma"),
    ("copy", r"memcpy|memset|copy"),
)
_COMPILED = tuple((name, re.compile(rx)) for name, rx in CATEGORIES)
_CONTROL = re.compile(r"(while|conditional|call)(\.|$)")


def categorize(kernel: str, hlo_op: str = "") -> str:
    """The category of one kernel ("other" when no pattern matches: elementwise/reduce fusions)."""
    text = f"{kernel} {hlo_op}".lower()
    for name, rx in _COMPILED:
        if rx.search(text):
            return name
    return "other"


@dataclasses.dataclass(frozen=True)
class TraceSummary:
    wall_ns: float  # first kernel start to last kernel end
    busy_ns: float  # union of kernel intervals (time the device did anything)
    by_category: dict[str, float]  # summed kernel time per category, ns
    top: list[tuple[str, str, float, int]]  # (kernel, category, total ns, count), largest first

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_ns / self.wall_ns if self.wall_ns else 0.0

    def format(self, steps: int = 1) -> str:
        total = sum(self.by_category.values()) or 1.0
        idle = 100 * self.idle_fraction
        lines = [f"trace: {self.wall_ns / 1e6 / steps:.2f} ms per step, device busy "
                 f"{100 - idle:.1f}% (idle gaps {idle:.1f}%)"]
        for name, ns in sorted(self.by_category.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<11} {ns / 1e6 / steps:9.2f} ms/step  {100 * ns / total:5.1f}%"
                         " of kernel time")
        lines.append("  top kernels:")
        for kernel, cat, ns, count in self.top[:15]:
            lines.append(f"    {ns / 1e6 / steps:8.2f} ms/step  x{count // max(steps, 1):<4} "
                         f"{cat:<10} {kernel[:90]}")
        return "\n".join(lines)


def find_trace(path: str | pathlib.Path) -> pathlib.Path:
    """The newest `*.xplane.pb` under `path` (a trace directory), or `path` itself if a file."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    files = sorted(path.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {path}")
    return files[-1]


def _kernel_events(profile) -> Iterable[tuple[str, str, float, float]]:
    """(kernel name, hlo op, start ns, duration ns) of the device's kernels."""
    device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
    if device_planes:
        for plane in device_planes:
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue  # "XLA Ops"/"XLA Modules" lines repeat the stream events
                for e in line.events:
                    stats = dict(e.stats)
                    yield e.name, str(stats.get("hlo_op", "")), e.start_ns, e.duration_ns
        return
    for plane in profile.planes:  # CPU: thunks that carry their HLO op
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                op = str(stats.get("hlo_op", ""))
                # Control flow thunks enclose their bodies' thunks, which are counted themselves.
                if op and e.duration_ns > 0 and not _CONTROL.match(op):
                    yield e.name, op, e.start_ns, e.duration_ns


def summarize_trace(path: str | pathlib.Path) -> TraceSummary:
    """Device time by kernel category in the trace at `path` (a file or a trace directory)."""
    from jax.profiler import ProfileData

    profile = ProfileData.from_file(str(find_trace(path)))
    by_category: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    intervals = []
    for kernel, hlo_op, start, duration in _kernel_events(profile):
        cat = categorize(kernel, hlo_op)
        by_category[cat] = by_category.get(cat, 0.0) + duration
        entry = per_kernel.setdefault(kernel, [cat, 0.0, 0])
        entry[1] += duration
        entry[2] += 1
        intervals.append((start, start + duration))
    if not intervals:
        raise ValueError(f"trace {path} holds no device kernels")
    intervals.sort()
    busy, (cur_start, cur_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    wall = max(e for _, e in intervals) - intervals[0][0]
    top = sorted(((k, c, ns, n) for k, (c, ns, n) in per_kernel.items()), key=lambda t: -t[2])
    return TraceSummary(wall_ns=wall, busy_ns=busy, by_category=by_category, top=top)
