"""Collectives in a compiled step, read from its optimized (per-device) HLO.

For every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute (synchronous or the ``-start`` half of an async pair) we
count the instruction and the full, unsharded size of the array it works on:
the operand of an all-reduce, reduce-scatter, all-to-all or permute, the
gathered result of an all-gather. Instructions inside loop bodies are counted
once (jaxscale's model unrolls its layers, so none of its collectives sit in a
loop).

The predicted time uses ring algorithms over a group of g devices: an
all-reduce moves 2·(g−1)/g of its bytes through each device, all-gather,
reduce-scatter and all-to-all (g−1)/g, a permute all of them.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?)\s+([\w\-]+)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(attrs: str, default: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        size = 1
        for axis in re.findall(r"'(\w+)'", m.group(2)):
            size *= sizes.get(axis, 1)
        return size
    m = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", attrs)
    if m:
        return int(m.group(1))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=", attrs)
    return 2 if m else default


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Per-device collective counts and bytes of one step.

    ``bytes`` and ``count`` are keyed by kind (``all-reduce``...);
    ``traffic_bytes`` is what a ring algorithm pushes through one device.
    """

    bytes: dict
    count: dict
    traffic_bytes: float

    def columns(self) -> dict:
        out = {}
        for kind in KINDS:
            name = kind.replace("-", "_")
            out[f"{name}_bytes"] = self.bytes[kind]
            out[f"{name}_count"] = self.count[kind]
        out["collective_traffic_bytes"] = int(self.traffic_bytes)
        return out


def count_collectives(hlo_text: str, n_devices: int) -> Collectives:
    """Count collectives and their full-array bytes in optimized HLO text."""
    shapes: dict[str, str] = {}
    found = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands, attrs = m.groups()
        shapes[name] = shape
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in KINDS:
            found.append((base, op.endswith("-start"), shape, operands, attrs))
    size = {k: 0 for k in KINDS}
    count = {k: 0 for k in KINDS}
    traffic = 0.0
    for kind, is_start, shape, operands, attrs in found:
        operand_names = re.findall(r"%([\w.\-]+)", operands)
        operand_bytes = sum(_shape_bytes(shapes.get(n, "")) for n in operand_names) or _shape_bytes(operands)
        result_bytes = _shape_bytes(shape)
        if kind == "all-gather":
            full = result_bytes - operand_bytes if is_start and shape.startswith("(") else result_bytes
        elif kind in ("all-reduce", "all-to-all"):
            full = result_bytes if not is_start or not shape.startswith("(") else operand_bytes
        else:
            full = operand_bytes
        g = max(_group_size(attrs, n_devices), 1)
        factor = {"all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}.get(kind, (g - 1) / g)
        size[kind] += full
        count[kind] += 1
        traffic += full * factor
    return Collectives(bytes=size, count=count, traffic_bytes=traffic)
