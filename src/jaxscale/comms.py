"""What a compiled step's optimized HLO says it communicates (and computes out of XLA's sight).

The per-device HLO module is read as computations of instructions, with the
call graph between them (fusions, async wrappers, while bodies and
conditions, branches). Every computation gets a multiplicity: how many times
one step runs it. A while body runs its trip count times; the count comes from
``known_trip_count`` in the while's backend_config (the CPU and GPU compilers
print it) or, where the compiler does not print it (the TPU compiler), from
the loop's condition ``i < N`` and the constant the counter starts from.

Each branch of a conditional is counted as if it ran (an upper bound; jaxscale's
steps have none).

Per-step semantics of the collective counts:

- A collective counts once per execution: ``count`` is executions per step,
  ``bytes`` the full array bytes moved per step. A collective in a loop body
  counts trip-count times.
- An async pair counts once: the ``-start`` half is read and the ``-done``
  half skipped; ``async-start`` wrappers count through the computation they
  call (``async-update`` and ``async-done`` name it too, and are not counted).
- Collectives inside fusions count (they run). An all-reduce inside the TPU
  compiler's ``all-reduce-scatter`` fusion (an all-reduce and a dynamic-slice
  that run as one reduce-scatter) counts as a reduce-scatter. The TPU compiler clones one
  collective into the start, body and done computations of an
  ``async_collective_fusion`` (a collective matmul); clones share the
  collective's ``channel_id``, so instructions with one channel_id are one
  collective, counted at the largest multiplicity among them.

``bytes`` is the full, unsharded size of the array each collective works on:
the operands of an all-reduce, reduce-scatter, all-to-all or permute, the
gathered result of an all-gather; every operand of a tuple (combined)
collective counts. The traffic through one device follows ring algorithms
over a group of g devices: an all-reduce moves 2·(g−1)/g of its bytes, an
all-gather, reduce-scatter or all-to-all (g−1)/g, a permute all of them.

Replica groups name the devices of each group by their position in the
step's device assignment (the mesh's devices in flattened order), so each
collective is attributed to the mesh axes along which its groups' devices
differ (``collective_axes``).
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE_KIND = {**{k: k for k in KINDS}, **{f"{k}-start": k for k in KINDS}, "ragged-all-to-all": "all-to-all"}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_NAME_EQ = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALL_ATTRS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|"
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


@dataclasses.dataclass
class HloModule:
    """An HLO module as computations of instructions, with how often one step runs each."""

    computations: dict[str, list[Instruction]]
    entry: str
    instructions: dict[str, Instruction]
    multiplicity: dict[str, int]
    unknown_trip_counts: int

    @classmethod
    def parse(cls, text: str) -> "HloModule":
        computations: dict[str, list[Instruction]] = {}
        instructions: dict[str, Instruction] = {}
        entry, current = "", None
        for raw in text.splitlines():
            line = _COMMENT.sub("", raw).rstrip()
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
            inst = _parse_instruction(line, current)
            if inst:
                computations[current].append(inst)
                instructions[inst.name] = inst
        if not entry and computations:
            entry = list(computations)[-1]
        module = cls(computations, entry, instructions, {}, 0)
        module._count_executions()
        return module

    def bytes_of(self, name: str) -> int:
        inst = self.instructions.get(name)
        return shape_bytes(inst.shape) if inst else 0

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
                for attr, value in _CALL_ATTRS.findall(inst.attrs):
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


def shape_bytes(text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed); layouts are ignored."""
    total = 0
    for dtype, dims in _ARRAY.findall(_COMMENT.sub("", text)):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


# ---------------------------------------------------------------- replica groups


def replica_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective (positions in the device assignment).

    Reads the explicit ``{{0,1},{2,3}}`` form, the iota form ``[2,4]<=[4,2]T(1,0)``,
    the mesh form ``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`` and a permute's
    ``source_target_pairs`` (each pair a group). An empty or absent list is
    one group of every device.
    """
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        return [[int(x) for x in pair.split(",")] for pair in re.findall(r"\{(\d+,\d+)", m.group(1) + "}")]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'?([\w]+)'?\s*=\s*(\d+)", m.group(1))
        names = [a for a, _ in axes]
        sizes = [int(s) for _, s in axes]
        chosen = [names.index(a) for a in re.findall(r"'?([\w]+)'?", m.group(2)) if a in names]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in chosen]
        group = int(np.prod([sizes[i] for i in chosen])) if chosen else 1
        return ids.transpose(rest + chosen).reshape(-1, group).tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        reshape = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(reshape))).reshape(reshape)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m and m.group(1):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(n_devices))]


def collective_axes(groups: list[list[int]], mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Mesh axes (indices) along which the devices of some group differ."""
    size = int(np.prod(mesh_shape))
    axes: set[int] = set()
    for g in groups:
        members = [d for d in g if 0 <= d < size]
        if len(members) < 2:
            continue
        coords = np.array(np.unravel_index(members, mesh_shape))
        axes |= {a for a in range(len(mesh_shape)) if len(set(coords[a])) > 1}
    return tuple(sorted(axes))


# -------------------------------------------------------------------- collectives


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the step.

    Attributes:
      kind: all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute.
      name: the HLO instruction.
      full_bytes: full array bytes of one execution.
      times: executions per step.
      groups: device groups (positions in the device assignment).
      group_size: devices per group.
    """

    kind: str
    name: str
    full_bytes: int
    times: int
    groups: tuple[tuple[int, ...], ...]
    group_size: int

    @property
    def ring_factor(self) -> float:
        g = max(self.group_size, 1)
        return {"all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}.get(self.kind, (g - 1) / g)

    @property
    def traffic_bytes(self) -> float:
        """Bytes through one device per step under ring algorithms."""
        return self.full_bytes * self.times * self.ring_factor


def _full_bytes(module: HloModule, inst: Instruction, kind: str) -> int:
    operand_bytes = sum(module.bytes_of(o) for o in inst.operands)
    result_bytes = shape_bytes(inst.shape)
    if kind == "all-gather":
        # all-gather-start's shape is (operands..., results...); a plain one's is the results.
        return result_bytes - operand_bytes if inst.opcode.endswith("-start") else result_bytes
    if operand_bytes:
        return operand_bytes
    return result_bytes


def find_collectives(hlo_text: str | HloModule, n_devices: int) -> list[Collective]:
    """Every collective of a per-device HLO module, with executions per step."""
    module = hlo_text if isinstance(hlo_text, HloModule) else HloModule.parse(hlo_text)
    by_channel: dict[str, Collective] = {}
    out: list[Collective] = []
    for comp, insts in module.computations.items():
        times = module.multiplicity.get(comp, 0)
        for inst in insts:
            kind = _OPCODE_KIND.get(inst.opcode)
            if kind is None:
                continue
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                # The TPU compiler's reduce-scatter: an all-reduce and a dynamic-slice fused
                # into one collective that leaves each device its shard.
                kind = "reduce-scatter"
            groups = tuple(tuple(g) for g in replica_groups(inst.attrs, n_devices))
            size = 2 if kind == "collective-permute" else max((len(g) for g in groups), default=1)
            c = Collective(kind, inst.name, _full_bytes(module, inst, kind), times, groups, size)
            channel = re.search(r"channel_id=(\d+)", inst.attrs)
            if channel:
                key = f"{kind}|{channel.group(1)}"
                if key not in by_channel or by_channel[key].times < times:
                    by_channel[key] = c
            else:
                out.append(c)
    return [c for c in out + list(by_channel.values()) if c.times > 0]


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Per-device collective counts and bytes of one step.

    ``bytes`` and ``count`` are keyed by kind (``all-reduce``...), per step;
    ``traffic_bytes`` is what ring algorithms push through one device;
    ``items`` lists the collectives; ``unknown_trip_counts`` counts loops
    whose trip count could not be read (their bodies were counted once).
    """

    bytes: dict
    count: dict
    traffic_bytes: float
    items: tuple[Collective, ...] = ()
    unknown_trip_counts: int = 0

    def columns(self) -> dict:
        out = {}
        for kind in KINDS:
            name = kind.replace("-", "_")
            out[f"{name}_bytes"] = self.bytes[kind]
            out[f"{name}_count"] = self.count[kind]
        out["collective_traffic_bytes"] = int(self.traffic_bytes)
        return out

    def traffic_by_axes(self, mesh_shape: tuple[int, ...]) -> dict[tuple[int, ...], float]:
        """Ring traffic bytes per device, keyed by the mesh axes each collective runs over."""
        out: dict[tuple[int, ...], float] = {}
        for c in self.items:
            axes = collective_axes([list(g) for g in c.groups], mesh_shape)
            if c.traffic_bytes:
                out[axes] = out.get(axes, 0.0) + c.traffic_bytes
        return out


def count_collectives(hlo_text: str, n_devices: int) -> Collectives:
    """Count collectives and their full-array bytes per step in optimized HLO text."""
    module = HloModule.parse(hlo_text)
    items = find_collectives(module, n_devices)
    size = {k: 0 for k in KINDS}
    count = {k: 0 for k in KINDS}
    for c in items:
        size[c.kind] += c.full_bytes * c.times
        count[c.kind] += c.times
    return Collectives(bytes=size, count=count, traffic_bytes=sum(c.traffic_bytes for c in items),
                       items=tuple(items), unknown_trip_counts=module.unknown_trip_counts)


# ------------------------------------------------------------ fused attention calls


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A fused attention kernel in the HLO (cuDNN ``__cudnn$fmha*`` custom calls)."""

    target: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    backward: bool
    causal: bool
    flash: bool
    times: int


def attention_calls(hlo_text: str | HloModule) -> list[AttentionCall]:
    """The cuDNN fused-attention custom calls of a module, with executions per step.

    Dimensions come from the call's backend_config: ``intermediate_tensor_shape``
    is the score matrix [B, N, T, S]; the head dimension is the last axis of the
    first operand (Q, in BTNH or BNTH layout). ``mask_type`` CAUSAL (or
    PADDING_CAUSAL) marks a causal kernel.
    """
    module = hlo_text if isinstance(hlo_text, HloModule) else HloModule.parse(hlo_text)
    out = []
    for comp, insts in module.computations.items():
        for inst in insts:
            if inst.opcode != "custom-call":
                continue
            target = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
            if not target or not target.group(1).startswith("__cudnn$fmha"):
                continue
            config = _backend_config(inst.attrs).get("cudnn_fmha_backend_config", {})
            dims = [int(d) for d in config.get("intermediate_tensor_shape", {}).get("dimensions", [])]
            q = module.instructions.get(inst.operands[0]) if inst.operands else None
            q_dims = _ARRAY.findall(q.shape) if q else []
            if len(dims) != 4 or not q_dims:
                continue
            head_dim = int(q_dims[0][1].split(",")[-1])
            mask = str(config.get("mask_type", ""))
            out.append(AttentionCall(target.group(1), *dims, head_dim=head_dim,
                                     backward="Backward" in target.group(1), causal="CAUSAL" in mask,
                                     flash=bool(config.get("is_flash_attention", True)),
                                     times=module.multiplicity.get(comp, 1)))
    return out


def _backend_config(attrs: str) -> dict:
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
