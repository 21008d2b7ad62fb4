"""Optimized HLO text → a module: computations of instructions, their shapes, and how often one step runs each.

The one parser of the package: comms.py, opflops.py and hlo_cost.py read the same
``HloModule``. A module is read as computations of instructions, with the call
graph between them (fusions, async wrappers, while bodies and conditions,
branches, calls). Every computation gets a multiplicity: how many times one
step runs it. A while body runs its trip count times; the count comes from
``known_trip_count`` in the while's backend_config (the CPU and GPU compilers
print it) or, where the compiler does not print it (the TPU compiler), from the
loop's condition ``i < N``, the constant the counter starts from and the step
the body adds. Each branch of a conditional is counted as if it ran.

A shape is read as its arrays (a tuple's leaves), each with its dtype,
dimensions and memory space (0: device memory; ``S(1)``, the TPU's on-chip
VMEM; ``S(5)``, host memory).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

# ------------------------------------------------------------------ shapes

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1, "s4": 1,
               "u4": 1, "s2": 1, "u2": 1}
ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\](\{[^{}]*\})?")
_COMMENT = re.compile(r"/\*.*?\*/")
_SPACE = re.compile(r"S\((\d+)\)")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: dtype, dimensions and memory space (0: device memory)."""

    dtype: str
    dims: tuple[int, ...]
    space: int = 0

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.elements * DTYPE_BYTES[self.dtype]


def arrays(shape: str) -> list[Array]:
    """The arrays of an HLO shape (a tuple's leaves in order), with the memory space of each layout."""
    out = []
    for dtype, dims, layout in ARRAY.findall(_COMMENT.sub("", shape)):
        if dtype not in DTYPE_BYTES:
            continue
        space = _SPACE.search(layout) if layout else None
        out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


def shape_bytes(text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed), whatever their memory space."""
    return sum(a.nbytes for a in arrays(text))


# ------------------------------------------------------------------ parsing

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_NAME_EQ = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
CALL_ATTRS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|"
                        r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    computation: str
    is_root: bool = False

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def target(self) -> str:
        """A custom call's target ("" for other opcodes)."""
        m = re.search(r'custom_call_target="([^"]+)"', self.attrs)
        return m.group(1) if m else ""


def called(inst: Instruction) -> list[str]:
    """Computations a kernel runs inside itself (fusion bodies, nested fusions)."""
    out = []
    for attr, value in CALL_ATTRS.findall(inst.attrs):
        if attr in ("calls", "called_computations"):
            out += re.findall(r"[\w.\-]+", value.replace("%", " "))
    return out


def _matching(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets of any kind."""
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _open_brackets(line: str) -> int:
    """Brackets ( and { a line leaves open, outside double-quoted strings."""
    depth, quoted, escaped = 0, False, False
    for c in line:
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "({":
            depth += 1
        elif c in ")}":
            depth -= 1
    return depth


def _parse_instruction(line: str, computation: str) -> Instruction | None:
    m = _NAME_EQ.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape, possibly nested, with layouts like {1,0:T(8,128)(2,1)}
        end = _matching(rest, 0)
    else:
        sm = re.match(r"[\w]+\[[^\]]*\](?:\{[^}]*\})?|[\w]+\[\]|token\[\]|[\w]+", rest)
        if not sm:
            return None
        end = sm.end()
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    opcode = om.group(1)
    close = _matching(rest, om.end() - 1)
    operand_text, attrs = rest[om.end():close - 1], rest[close:]
    operands = []
    for part in _split_top(operand_text):
        names = re.findall(r"%([\w.\-]+)", part)
        if names:
            operands.append(names[-1])
        elif re.fullmatch(r"[\w.\-]+", part):
            operands.append(part)
    return Instruction(m.group(1), shape, opcode, tuple(operands), attrs, computation,
                       is_root=line.lstrip().startswith("ROOT"))


def backend_config(attrs: str) -> dict:
    """An instruction's backend_config as a dict ({} when absent or not JSON)."""
    start = attrs.find("backend_config=")
    if start < 0:
        return {}
    brace = attrs.find("{", start)
    if brace < 0:
        return {}
    text = attrs[brace:_matching(attrs, brace, "{", "}")]
    try:
        return json.loads(text)
    except ValueError:
        return {}


@dataclasses.dataclass
class HloModule:
    """An HLO module as computations of instructions, with how often one step runs each."""

    computations: dict[str, list[Instruction]]
    entry: str
    instructions: dict[str, Instruction]
    multiplicity: dict[str, int]
    unknown_trip_counts: int
    platform: str = ""  # "tpu" when the layouts carry TPU tiles, else ""
    _local: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, text: str) -> "HloModule":
        computations: dict[str, list[Instruction]] = {}
        instructions: dict[str, Instruction] = {}
        entry, current, pending = "", None, ""
        for raw in text.splitlines():
            line = _COMMENT.sub("", raw).rstrip()
            if pending:  # an instruction whose attributes span lines (kernel metadata with newlines)
                line, pending = pending + " " + line.strip(), ""
            if not line:
                continue
            if current is None or not _NAME_EQ.match(line):
                header = _HEADER.match(line)
                if header and "=" not in line.split("(")[0]:
                    current = header.group(2)
                    computations[current] = []
                    if header.group(1):
                        entry = current
                    continue
            if line.strip() == "}":
                current = None
                continue
            if current is None:
                continue
            if _open_brackets(line) > 0:
                pending = line
                continue
            inst = _parse_instruction(line, current)
            if inst:
                computations[current].append(inst)
                instructions[inst.name] = inst
        if not entry and computations:
            entry = list(computations)[-1]
        module = cls(computations, entry, instructions, {}, 0, "tpu" if ":T(" in text else "")
        module._count_executions()
        return module

    def operand(self, inst: Instruction, k: int = 0) -> Instruction | None:
        """Operand k of an instruction, looked up in its own computation first (hand-written HLO may
        reuse names across computations; XLA's never does)."""
        if k >= len(inst.operands):
            return None
        name = inst.operands[k]
        local = self._local.get(inst.computation)
        if local is None:
            local = self._local[inst.computation] = {i.name: i for i in self.computations.get(inst.computation, [])}
        return local.get(name) or self.instructions.get(name)

    def bytes_of(self, name: str) -> int:
        inst = self.instructions.get(name)
        return shape_bytes(inst.shape) if inst else 0

    def root(self, computation: str) -> Instruction | None:
        insts = self.computations.get(computation, [])
        return next((i for i in insts if i.is_root), insts[-1] if insts else None)

    def _count_executions(self) -> None:
        calls: dict[str, list[tuple[str, int]]] = {c: [] for c in self.computations}  # callee -> (caller, factor)
        unknown = 0
        for comp, insts in self.computations.items():
            for inst in insts:
                if inst.opcode in ("async-update", "async-done"):
                    continue  # they name the computation async-start runs; it runs once
                trip = None
                if inst.opcode == "while":
                    trip = self.trip_count(inst)
                    if trip is None:
                        unknown += 1
                for attr, value in CALL_ATTRS.findall(inst.attrs):
                    if attr == "to_apply" and inst.opcode != "call":  # reducers run per element
                        continue
                    factor = (trip or 1) if attr in ("body", "condition") else 1
                    for callee in re.findall(r"[\w.\-]+", value.replace("%", " ")):
                        if callee in calls:
                            calls[callee].append((comp, factor))
        memo: dict[str, int] = {}

        def times(comp: str, seen=()) -> int:
            if comp == self.entry:
                return 1
            if comp in memo:
                return memo[comp]
            if comp in seen:
                return 0
            total = sum(times(caller, seen + (comp,)) * f for caller, f in calls.get(comp, []))
            memo[comp] = total
            return total

        self.multiplicity = {c: times(c) for c in self.computations}
        self.unknown_trip_counts = unknown

    def trip_count(self, loop: Instruction) -> int | None:
        """Iterations of a while loop: known_trip_count, else read off ``i < N`` with i's constant start."""
        m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', loop.attrs)
        if m:
            return int(m.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", loop.attrs)
        if not cond or cond.group(1) not in self.computations:
            return None
        insts = self.computations[cond.group(1)]
        by_name = {i.name: i for i in insts}
        root = next((i for i in insts if i.is_root), None)
        if root is None or root.opcode != "compare" or len(root.operands) != 2:
            return None
        direction = re.search(r"direction=(\w+)", root.attrs)
        direction = direction.group(1) if direction else ""
        lhs, rhs = (self._through_copies(by_name.get(o)) for o in root.operands)
        if direction in ("GT", "GE"):  # N > i is i < N
            lhs, rhs = rhs, lhs
            direction = {"GT": "LT", "GE": "LE"}[direction]
        if direction not in ("LT", "LE") or lhs is None or rhs is None:
            return None
        limit = _constant(rhs)
        if limit is None or lhs.opcode != "get-tuple-element":
            return None
        index = re.search(r"index=(\d+)", lhs.attrs)
        init_tuple = self.instructions.get(loop.operands[0]) if loop.operands else None
        if index is None or init_tuple is None or init_tuple.opcode != "tuple":
            return None
        k = int(index.group(1))
        if k >= len(init_tuple.operands):
            return None
        start = _constant(self._through_copies(self.instructions.get(init_tuple.operands[k])))
        if start is None:
            return None
        step = self._loop_step(loop, k)
        if step is None:
            return None
        span = limit - start + (direction == "LE")
        return max(-(-span // step), 0)

    def _loop_step(self, loop: Instruction, k: int) -> int | None:
        """What a loop body adds to tuple element k each trip (the TPU's windowed
        matmul loops step by 2), read off the body's root tuple; 1 when not an add."""
        body = re.search(r"body=%?([\w.\-]+)", loop.attrs)
        insts = self.computations.get(body.group(1), []) if body else []
        root = next((i for i in insts if i.is_root), None)
        if root is None or root.opcode != "tuple" or k >= len(root.operands):
            return 1
        update = self._through_copies(self.instructions.get(root.operands[k]))
        if update is None or update.opcode != "add":
            return 1
        for a, b in (update.operands, update.operands[::-1]):
            counter = self._through_copies(self.instructions.get(a))
            step = _constant(self._through_copies(self.instructions.get(b)))
            if counter is not None and counter.opcode == "get-tuple-element" and step is not None:
                if re.search(rf"index={k}\b", counter.attrs):
                    return step if step > 0 else None
        return 1

    def _through_copies(self, inst: Instruction | None) -> Instruction | None:
        while inst is not None and inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
            inst = self.instructions.get(inst.operands[0])
        return inst


def _constant(inst: Instruction | None) -> int | None:
    if inst is None or inst.opcode != "constant":
        return None
    m = re.search(r"constant\((-?\d+)\)", f"constant({inst.operands[0]})" if inst.operands else "")
    return int(m.group(1)) if m else None


def parse(hlo: str | HloModule) -> HloModule:
    """The module of an HLO text. The FLOP count, the communication model and the roofline each read a step's
    program: the last few texts are parsed once (a module is never changed after parsing)."""
    return hlo if isinstance(hlo, HloModule) else _parse_text(hlo)


@functools.lru_cache(maxsize=4)
def _parse_text(text: str) -> HloModule:
    return HloModule.parse(text)
