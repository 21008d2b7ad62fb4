"""What a compiled step's optimized HLO says it communicates: each collective, its bytes, groups and mesh axes.

The per-device HLO module is read by hlo.HloModule (the one parser): computations
of instructions, the call graph between them, and how many times one step runs
each computation (loop trip counts included).

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
  collective, counted as often as its start runs (the computation beside the
  ``AsyncCollectiveStart`` custom call; a start before a loop whose body holds
  clones runs once), else at the largest multiplicity among them.

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
import re

import numpy as np

from jaxscale.hlo import HloModule, Instruction, parse, shape_bytes

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE_KIND = {**{k: k for k in KINDS}, **{f"{k}-start": k for k in KINDS}, "ragged-all-to-all": "all-to-all"}


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
      channel: its channel_id ("" where none), which pairs it with the kernels that run it.
    """

    kind: str
    name: str
    full_bytes: int
    times: int
    groups: tuple[tuple[int, ...], ...]
    group_size: int
    channel: str = ""  # channel_id, "" where the HLO gives none

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
    module = parse(hlo_text)
    by_channel: dict[str, Collective] = {}
    started: set[str] = set()  # channels whose instance sits beside the TPU's AsyncCollectiveStart
    out: list[Collective] = []
    for comp, insts in module.computations.items():
        times = module.multiplicity.get(comp, 0)
        is_start = any(i.opcode == "custom-call" and i.target == "AsyncCollectiveStart" for i in insts)
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
            channel = re.search(r"channel_id=(\d+)", inst.attrs)
            c = Collective(kind, inst.name, _full_bytes(module, inst, kind), times, groups, size,
                           channel.group(1) if channel else "")
            if channel:
                key = f"{kind}|{channel.group(1)}"
                if is_start:  # the collective runs as often as its start does, whatever its clones' loops
                    by_channel[key] = c
                    started.add(key)
                elif key not in started and (key not in by_channel or by_channel[key].times < times):
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


def count_collectives(hlo_text: str | HloModule, n_devices: int) -> Collectives:
    """Count collectives and their full-array bytes per step in optimized HLO text."""
    module = parse(hlo_text)
    items = find_collectives(module, n_devices)
    size = {k: 0 for k in KINDS}
    count = {k: 0 for k in KINDS}
    for c in items:
        size[c.kind] += c.full_bytes * c.times
        count[c.kind] += c.times
    return Collectives(bytes=size, count=count, traffic_bytes=sum(c.traffic_bytes for c in items),
                       items=tuple(items), unknown_trip_counts=module.unknown_trip_counts)
