"""Reading optimized HLO text: computations, how often each runs, and matmul FLOPs.

XLA's ``cost_analysis()`` counts the body of a while loop once, whatever its
trip count, so a model whose layers are one scanned layer (a loop of n_layers
trips) is undercounted by nearly n_layers. Deviceless GPU compiles return no
cost analysis at all. This module reads the program itself:

- every computation of the module and the instructions that call it
  (``calls=``, ``to_apply=``, ``body=``/``condition=`` of a while,
  ``branch_computations=``), so each computation gets the number of times one
  execution of the entry runs it: a while body runs ``known_trip_count`` times
  per execution of its caller (the trip count XLA prints in the while's
  backend_config);
- the FLOPs of every ``dot``: 2 × (elements of the result) × (product of the
  contracted dimensions of the left operand), counted once per run of the
  computation that holds it.

``loop_corrected_cost`` adds the trips that cost_analysis leaves out: for every
while loop, (trip count − 1) × the loop body's dot FLOPs, and (trip count − 1) ×
the bytes its body's top-level instructions read and write (operands plus
result, a stacked array of the loop counting the one slice a trip touches; an
estimate, since XLA's own byte count also looks inside fusions).
"""

from __future__ import annotations

import dataclasses
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
# Instructions that move no data of their own (views, tuples, parameters).
_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
             "replica-id", "iota"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result shape text
    op: str
    rest: str  # operands and attributes, as printed


@dataclasses.dataclass(frozen=True)
class Module:
    """An HLO module's computations, by name, and the name of its entry."""

    computations: dict[str, list[Instruction]]
    entry: str

    def shapes(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations.get(computation, [])}


def _split_shape_op(text: str) -> tuple[str, str, str] | None:
    """``f32[2,3]{1,0} dot(%a, %b), ...`` → (shape, op, rest); tuple shapes may nest."""
    text = text.strip()
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                shape, tail = text[:i + 1], text[i + 1:]
                break
        else:
            return None
    else:
        m = re.match(r"([\w]+\[[^\]]*\](?:\{[^ ]*\})?|[\w]+\[\]|token\[\]|\w+)\s", text + " ")
        if not m:
            return None
        shape, tail = m.group(1), text[m.end(1):]
    m = re.match(r"\s*([\w\-]+)\((.*)$", tail)
    if not m:
        return None
    return shape, m.group(1), m.group(2)


def parse_module(text: str) -> Module:
    """Split optimized HLO text into computations of instructions."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("//") or stripped.startswith("HloModule"):
            continue
        header = _HEADER.match(stripped)
        if header and "=" not in stripped.split("(")[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if stripped == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parts = _split_shape_op(m.group(2))
        if parts:
            computations[current].append(Instruction(m.group(1), *parts))
    return Module(computations, entry)


def shape_elements(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a shape text as (dtype, dims); tuples give several."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in shape_elements(shape):
        n = 1
        for d in dims:
            n *= d
        total += n * _DTYPE_BYTES[dtype]
    return total


def callees(instruction: Instruction) -> list[tuple[str, int]]:
    """(computation, runs per execution of the instruction) of everything it calls."""
    out = []
    trip = trip_count(instruction)
    for kind, name in _CALLEE.findall(instruction.rest):
        if kind == "to_apply" and instruction.op in ("reduce", "reduce-window", "scatter", "select-and-scatter",
                                                     "sort", "all-reduce", "reduce-scatter", "all-reduce-start"):
            continue  # scalar reducers: no dots, and XLA counts their work in the caller
        if instruction.op == "while":
            out.append((name, trip if kind == "body" else trip + 1))
        else:
            out.append((name, 1))
    branches = _BRANCHES.search(instruction.rest)
    if branches:  # a conditional runs one branch; count each once (an upper bound)
        out += [(b.strip().lstrip("%"), 1) for b in branches.group(1).split(",") if b.strip()]
    return out


def trip_count(instruction: Instruction) -> int:
    """The known trip count of a while instruction (1 when XLA does not print one)."""
    m = _TRIP.search(instruction.rest)
    return int(m.group(1)) if m else 1


def multiplicities(module: Module) -> dict[str, int]:
    """How many times one execution of the entry runs each computation."""
    runs = {module.entry: 1}
    order = [module.entry]
    seen = {module.entry}
    # Breadth-first over the call graph; HLO call graphs are acyclic.
    i = 0
    callers: dict[str, list[tuple[str, int]]] = {}
    while i < len(order):
        name = order[i]
        i += 1
        for instruction in module.computations.get(name, []):
            for callee, times in callees(instruction):
                callers.setdefault(callee, []).append((name, times))
                if callee not in seen and callee in module.computations:
                    seen.add(callee)
                    order.append(callee)
    # Resolve in topological order (a callee's runs are the sum over its callers).
    resolved: dict[str, int] = {}

    def resolve(name: str, stack: tuple = ()) -> int:
        if name in resolved:
            return resolved[name]
        if name == module.entry:
            resolved[name] = 1
            return 1
        total = 0
        for caller, times in callers.get(name, []):
            if caller in stack:
                continue
            total += resolve(caller, stack + (name,)) * times
        resolved[name] = total
        return total

    for name in order:
        runs[name] = resolve(name)
    return runs


def dot_flops(instruction: Instruction, shapes: dict[str, str]) -> int:
    """2 × result elements × contracted size of a dot instruction; 0 for anything else."""
    if instruction.op != "dot":
        return 0
    result = shape_elements(instruction.shape)
    operands = re.findall(r"%([\w.\-]+)", instruction.rest.split(")")[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.rest)
    if not result or not operands or not contracting:
        return 0
    lhs = shape_elements(shapes.get(operands[0], ""))
    if not lhs:
        return 0
    out = 1
    for d in result[0][1]:
        out *= d
    k = 1
    for axis in filter(None, contracting.group(1).split(",")):
        k *= lhs[0][1][int(axis)]
    return 2 * out * k


def computation_dot_flops(module: Module, name: str) -> int:
    """Dot FLOPs of one run of a computation, the computations it calls included."""
    total, shapes = 0, module.shapes(name)
    for instruction in module.computations.get(name, []):
        total += dot_flops(instruction, shapes)
        for callee, times in callees(instruction):
            if callee in module.computations:
                total += times * computation_dot_flops(module, callee)
    return total


def total_dot_flops(hlo_text: str) -> int:
    """Dot FLOPs of one execution of the module, loops counted per trip."""
    module = parse_module(hlo_text)
    if not module.entry:
        return 0
    return computation_dot_flops(module, module.entry)


def _trip_bytes(shape: str, trip: int) -> float:
    """Bytes one trip touches of an array: a stacked array (leading dimension = the
    trip count, read or written one slice per trip) counts one slice."""
    total = 0.0
    for dtype, dims in shape_elements(shape):
        n = 1
        for d in dims:
            n *= d
        n *= _DTYPE_BYTES[dtype]
        total += n / trip if dims and dims[0] == trip and trip > 1 else n
    return total


def _top_level_bytes(module: Module, name: str, trip: int) -> float:
    shapes = module.shapes(name)
    total = 0.0
    for instruction in module.computations.get(name, []):
        if instruction.op in _FREE_OPS or instruction.op == "while":
            continue
        operands = re.findall(r"%([\w.\-]+)", instruction.rest.split("), ")[0])
        if instruction.op == "dynamic-update-slice" or "dynamic-update-slice" in instruction.name:
            operands = operands[1:]  # updated in place: only the update is read and written
        total += _trip_bytes(instruction.shape, trip) + sum(_trip_bytes(shapes.get(o, ""), trip) for o in operands)
    return total


@dataclasses.dataclass(frozen=True)
class LoopCorrection:
    """What cost_analysis leaves out of a module's while loops (extra trips only)."""

    loops: int
    max_trip_count: int
    extra_flops: float
    extra_bytes: float


def loop_correction(hlo_text: str) -> LoopCorrection:
    """Dot FLOPs and bytes of the trips after the first of every while loop."""
    module = parse_module(hlo_text)
    if not module.entry:
        return LoopCorrection(0, 0, 0.0, 0.0)
    runs = multiplicities(module)
    loops, max_trip, flops, bytes_ = 0, 0, 0.0, 0.0
    for name, instructions in module.computations.items():
        for instruction in instructions:
            if instruction.op != "while":
                continue
            trip = trip_count(instruction)
            body = re.search(r"\bbody=%?([\w.\-]+)", instruction.rest)
            if not body or trip <= 1 or runs.get(name, 0) == 0:
                continue
            loops += 1
            max_trip = max(max_trip, trip)
            times = runs[name] * (trip - 1)
            flops += times * computation_dot_flops(module, body.group(1))
            bytes_ += times * _top_level_bytes(module, body.group(1), trip)
    return LoopCorrection(loops, max_trip, flops, bytes_)


def loop_corrected_cost(cost: dict, hlo_text: str) -> tuple[float | None, float | None, LoopCorrection]:
    """(flops, bytes accessed) of the per-device program with every loop trip counted.

    ``cost`` is XLA's cost_analysis dict. Where it has no FLOPs (deviceless GPU
    compiles), the dot FLOPs of the HLO stand in and bytes stay None.
    """
    correction = loop_correction(hlo_text)
    flops = cost.get("flops")
    bytes_ = cost.get("bytes accessed")
    if flops is None:
        dots = total_dot_flops(hlo_text)
        return (float(dots) if dots else None), None, correction
    flops = float(flops) + correction.extra_flops
    if bytes_ is not None:
        bytes_ = float(bytes_) + correction.extra_bytes
    return flops, bytes_, correction
