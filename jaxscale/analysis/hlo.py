"""Collectives in compiled HLO text, and XLA's warnings about sharding it had to undo.

`collectives(compiled.as_text(), num_devices)` lists every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute of the optimized (partitioned) module with its
bytes and its replica groups. Bytes are the whole buffer one device takes part with: the
gathered output of an all-gather, the input of a reduce-scatter, the reduced buffer of an
all-reduce, the buffer of an all-to-all or a collective-permute.

An all-reduce whose every use keeps only a slice of its result is a reduce-scatter in disguise:
the CPU backend lowers FSDP's gradient reduction that way, GPU and TPU emit a real reduce-scatter.
Their bytes are counted in `Collective.sliced_bytes` (per element of a combined, tuple-shaped
all-reduce), so that cost models can price them as reduce-scatters.

Instructions inside loop bodies are listed once, as they appear in the text (a scanned layer
stack's collectives appear once, not once per layer); `Collective.trips` holds the trip count
XLA recorded for the enclosing while loop when it is known, and `summarize` multiplies by it.

The CPU backend has no bfloat16 collectives: after the SPMD partitioner has placed a bf16
all-gather (FSDP gathers the weights after casting them to the compute dtype) or a bf16 gradient
reduction, its float normalization widens them to float32. GPUs and TPUs run them as
partitioned. `compile_partitioned` also returns the module as the partitioner left it, and
`as_partitioned` gives the compiled collectives the element widths of that module, so that a
step compiled on the CPU reports (and `jaxscale plan` prices) the bytes an accelerator moves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
    "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PASS_THROUGH = {"get-tuple-element", "bitcast", "copy", "reshape", "transpose", "convert"}
_SLICES = {"dynamic-slice", "slice"}

# XLA's SPMD partitioner logs this when a sharding cannot be reached without gathering the whole
# tensor on every device first (slow and memory hungry); it names the instruction.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    name: str  # HLO instruction name
    bytes: int  # per device: the whole buffer it takes part with (see the module docstring)
    group_size: int  # devices in each replica group
    groups: tuple[tuple[int, ...], ...]  # device ids of the replica groups (empty: unknown)
    trips: int = 1  # times it runs per step (the enclosing loop's trip count, when known)
    sliced_bytes: int = 0  # all-reduce: bytes of the results whose users keep only a slice
    op_name: str = ""  # the jax operation it comes from (the instruction's metadata)
    type: str = ""  # the instruction's HLO type (an array, or a tuple of them)


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    computation: str
    param_index: int | None = None  # for parameter(i): i


def array_bytes(type_text: str) -> list[int]:
    """Bytes of every array in an HLO type (`f32[8,64]{1,0}` or a tuple of them)."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _DTYPE_BYTES:
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            out.append(size * _DTYPE_BYTES[dtype])
    return out


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], f32[3]) all-reduce(...)' -> ('(f32[2], f32[3])', 'all-reduce(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].strip()
    head, _, tail = rest.partition(" ")
    return head, tail.strip()


def _operands(text: str) -> tuple[str, str]:
    """'op(a, b), attrs' -> ('a, b', 'attrs') with nested parentheses respected."""
    start = text.find("(")
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return text[start + 1: i], text[i + 1:]
    return text[start + 1:], ""


def parse(hlo_text: str) -> dict[str, _Instr]:
    """Instructions of an HLO module by name (names are unique within a module)."""
    instrs: dict[str, _Instr] = {}
    computation = ""
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and " = " not in line.split("{")[0]:
            computation = m.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        type_text, rest = _split_type(m.group(2).strip())
        opcode = rest.split("(", 1)[0].strip()
        operand_text, attrs = _operands(rest)
        index = int(operand_text) if opcode == "parameter" and operand_text.isdigit() else None
        instrs[m.group(1)] = _Instr(m.group(1), type_text, opcode, _NAME.findall(operand_text),
                                    attrs, computation, index)
    return instrs


def _mesh_groups(attrs: str) -> tuple[tuple[int, ...], ...] | None:
    """Groups of `replica_groups=mesh['a'=8,'b'=2] {'a'}` (devices numbered row-major)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if not m:
        return None
    axes = [(a.strip().strip("'"), int(s)) for a, s in
            (item.split("=") for item in m.group(1).split(",") if "=" in item)]
    chosen = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
    ids = np.arange(math.prod(s for _, s in axes)).reshape([s for _, s in axes] or [1])
    names = [a for a, _ in axes]
    keep = [names.index(a) for a in chosen if a in names]
    rest = [i for i in range(len(names)) if i not in keep]
    ids = np.transpose(ids, rest + keep).reshape(-1, math.prod(axes[i][1] for i in keep) or 1)
    return tuple(tuple(int(x) for x in row) for row in ids)


def _iota_groups(attrs: str) -> tuple[tuple[int, ...], ...] | None:
    """Groups of `replica_groups=[2,4]<=[8]` or `[4,2]<=[2,4]T(1,0)` (iota tile assignment)."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if not m:
        return None
    shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(int(x) for x in m.group(2).split(",")))
    ids = ids.reshape([int(x) for x in m.group(2).split(",")])
    if m.group(3):
        ids = np.transpose(ids, [int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(shape[0], -1)
    return tuple(tuple(int(x) for x in row) for row in ids)


def replica_groups(attrs: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """The replica groups of a collective's attribute text, as tuples of device ids."""
    for parse_groups in (_mesh_groups, _iota_groups):
        groups = parse_groups(attrs)
        if groups is not None:
            return groups
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
    if m and m.group(1).strip():
        return tuple(tuple(int(x) for x in g.split(",") if x.strip())
                     for g in re.findall(r"\{([\d,\s]*)\}", m.group(1)))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:  # collective-permute: each pair is a "group" of two
        pairs = re.findall(r"\{(\d+),(\d+)", m.group(0))
        return tuple((int(a), int(b)) for a, b in pairs)
    return (tuple(range(num_devices)),)  # empty groups: every device


def _kind(instr: _Instr, calls: dict[str, str]) -> str | None:
    op = instr.opcode
    if op.endswith("-done"):
        return None
    if op.endswith("-start"):
        op = op[: -len("-start")]
    if op == "async-start":  # a wrapped collective: the called computation's root says which
        m = re.search(r"calls=%([\w.\-]+)", instr.attrs)
        op = calls.get(m.group(1), "") if m else ""
    return op if op in KINDS else None


def _users(instrs: dict[str, _Instr]) -> dict[str, list[_Instr]]:
    users: dict[str, list[_Instr]] = {}
    for instr in instrs.values():
        for operand in instr.operands:
            users.setdefault(operand, []).append(instr)
    return users


def _only_sliced(name: str, instrs, users, by_comp, depth: int = 0) -> bool:
    """Whether every use of `name` (through pass-through ops and fusion parameters) is a slice."""
    if depth > 8:
        return False
    uses = users.get(name, [])
    if not uses:
        return False
    for use in uses:
        if use.opcode in _SLICES:
            continue
        if use.opcode in _PASS_THROUGH:
            if not _only_sliced(use.name, instrs, users, by_comp, depth + 1):
                return False
        elif use.opcode == "fusion":
            if not _fusion_param_sliced(use, name, instrs, users, by_comp, depth):
                return False
        else:
            return False
    return True


def _fusion_param_sliced(fusion: _Instr, operand: str, instrs, users, by_comp, depth) -> bool:
    m = re.search(r"calls=%([\w.\-]+)", fusion.attrs)
    if not m:
        return False
    indices = [i for i, o in enumerate(fusion.operands) if o == operand]
    params = [i for i in by_comp.get(m.group(1), [])
              if i.opcode == "parameter" and i.param_index in indices]
    return bool(params) and all(_only_sliced(p.name, instrs, users, by_comp, depth + 1)
                                for p in params)


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective of an optimized HLO module (see the module docstring)."""
    instrs = parse(hlo_text)
    by_comp: dict[str, list[_Instr]] = {}
    for instr in instrs.values():
        by_comp.setdefault(instr.computation, []).append(instr)
    # The opcode of each computation's last instruction (its root): what an async-start runs.
    calls = {comp: body[-1].opcode for comp, body in by_comp.items()}
    trips = _loop_trips(instrs)
    users = _users(instrs)
    out = []
    for instr in instrs.values():
        kind = _kind(instr, calls)
        if kind is None:
            continue
        groups = replica_groups(instr.attrs, num_devices)
        size = max(len(g) for g in groups) if kind != "collective-permute" else 2
        sizes = array_bytes(instr.type)
        if instr.opcode == "all-reduce-start":
            nbytes = sum(sizes)  # its result is the reduced buffer(s), like all-reduce's
        elif instr.opcode.endswith("-start"):
            # (operands, outputs[, contexts]): the largest array is the collective's buffer
            nbytes = max(sizes, default=0)
        else:
            nbytes = sum(sizes)
        if kind == "reduce-scatter" and not instr.opcode.endswith("-start"):
            nbytes *= size
        sliced = _sliced_bytes(instr, sizes, instrs, users, by_comp) if kind == "all-reduce" else 0
        op = _OP_NAME.search(instr.attrs)
        out.append(Collective(kind, instr.name, nbytes, size, groups,
                              trips.get(instr.computation, 1), sliced, op.group(1) if op else "",
                              instr.type))
    return out


def _sliced_bytes(instr: _Instr, sizes: list[int], instrs, users, by_comp) -> int:
    """Bytes of an all-reduce's results that every user slices (per tuple element)."""
    if not instr.type.startswith("("):
        return sum(sizes) if _only_sliced(instr.name, instrs, users, by_comp) else 0
    total = 0
    for use in users.get(instr.name, []):
        m = re.search(r"index=(\d+)", use.attrs)
        if use.opcode != "get-tuple-element" or not m or int(m.group(1)) >= len(sizes):
            return total  # used whole somewhere: count only what is proven sliced
        if _only_sliced(use.name, instrs, users, by_comp):
            total += sizes[int(m.group(1))]
    return total


def _loop_trips(instrs: dict[str, _Instr]) -> dict[str, int]:
    """computation name -> trip count of the while loop whose body it is (when XLA knows it)."""
    out = {}
    for instr in instrs.values():
        if instr.opcode != "while":
            continue
        m = re.search(r"body=%([\w.\-]+)", instr.attrs)
        n = _TRIPS.search(instr.attrs)
        if m and n:
            out[m.group(1)] = int(n.group(1))
    return out


# The module dumped right after this pass is the partitioned one (`compile_partitioned`).
_PARTITIONER = "spmd-partitioning"


def compile_partitioned(lowered: Any) -> tuple[Any, str]:
    """Compile a `jax.stages.Lowered`: (the compiled step, the text of its HLO module right after
    the SPMD partitioner, "" when no partitioner ran (one device)).

    The module is read from XLA's own dump of that one pass, written to a temporary directory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        compiled = lowered.compile({"xla_dump_to": tmp, "xla_dump_hlo_pass_re": _PARTITIONER})
        names = sorted(n for n in os.listdir(tmp) if f"after_{_PARTITIONER}." in n)
        if not names:
            return compiled, ""
        with open(os.path.join(tmp, names[-1])) as f:
            return compiled, f.read()


def as_partitioned(items: Sequence[Collective], partitioned_text: str) -> list[Collective]:
    """`items` (the compiled module's collectives) in the element widths of the partitioned
    module (see the module docstring): an array whose jax operation the partitioner gave
    narrower elements (bf16 where the CPU compiled f32) has its bytes scaled to them.

    Collectives are matched by kind and jax operation name. A combined collective (a tuple)
    names its elements' operations as ``prefix/first:second:...``, the later ones relative to
    the common prefix; a name is matched exactly, else to the one partitioned operation that
    ends with it.
    """
    if not partitioned_text:
        return list(items)
    narrow: dict[tuple[str, str], int] = {}
    for instr in parse(partitioned_text).values():
        kind, op = _kind(instr, {}), _OP_NAME.search(instr.attrs)
        widths = {_DTYPE_BYTES[d] for d, _ in _ARRAY.findall(instr.type) if d in _DTYPE_BYTES}
        if kind and op and len(widths) == 1:
            key, width = (kind, op.group(1)), widths.pop()
            narrow[key] = min(width, narrow.get(key, width))

    def width_of(kind: str, name: str) -> int | None:
        if (kind, name) in narrow:
            return narrow[kind, name]
        found = {w for (k, n), w in narrow.items() if k == kind and n.endswith("/" + name)}
        return found.pop() if len(found) == 1 else None

    out = []
    for c in items:
        arrays = [(d, dims) for d, dims in _ARRAY.findall(c.type) if d in _DTYPE_BYTES]
        names = c.op_name.split(":")
        if len(names) != len(arrays):
            names = [names[0]] * len(arrays)
        full = partial = 0
        for (dtype, dims), name in zip(arrays, names, strict=True):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            width = _DTYPE_BYTES[dtype]
            full += size * width
            partial += size * min(width, width_of(c.kind, name) or width)
        if partial < full:
            ratio = partial / full
            c = dataclasses.replace(c, bytes=round(c.bytes * ratio),
                                    sliced_bytes=round(c.sliced_bytes * ratio))
        out.append(c)
    return out


@dataclasses.dataclass(frozen=True)
class KindSummary:
    count: int  # instructions per step (loop bodies counted once per trip)
    bytes: int  # summed bytes per step


def summarize(items: Iterable[Collective]) -> dict[str, KindSummary]:
    """Count and bytes per kind, per step: loop bodies weighed by their trip counts."""
    out = {kind: KindSummary(0, 0) for kind in KINDS}
    for c in items:
        s = out[c.kind]
        out[c.kind] = KindSummary(s.count + c.trips, s.bytes + c.bytes * c.trips)
    return out


def format_collectives(items: Sequence[Collective]) -> str:
    """A table: kind, count and bytes per step (what a step moves per device)."""
    from jaxscale.core.units import format_bytes

    summary = summarize(items)
    sliced = sum(c.sliced_bytes * c.trips for c in items)
    lines = [f"{'collective':<20}{'count':>7}{'bytes/device/step':>20}"]
    for kind, s in summary.items():
        lines.append(f"{kind:<20}{s.count:>7}{format_bytes(s.bytes):>20}")
    if sliced:
        lines.append(f"({format_bytes(sliced)} of the all-reduced bytes are only sliced "
                     "afterwards: reduce-scatters on GPU/TPU)")
    return "\n".join(lines)


def involuntary_remats(log_text: str) -> list[str]:
    """XLA log lines reporting an involuntary full rematerialization (one per occurrence)."""
    return [line.strip() for line in log_text.splitlines() if INVOLUNTARY_REMAT in line]
