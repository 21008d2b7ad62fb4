"""What one step of an optimized HLO program costs: its kernels, their FLOPs and HBM bytes, every loop trip counted.

A **kernel** is a top-level instruction of a computation that runs at top
level (the entry, while bodies and conditions, conditional branches, called
computations; not fusion bodies, reducers or async wrappers): fusions, custom
calls, copies, collectives and any unfused op, one launch each. Parameters,
tuples, get-tuple-element, bitcasts, constants, the ``-done`` half of an async
pair, while/conditional/call themselves and scalar bookkeeping (a non-fusion op
with a scalar result, such as a loop counter) are free. Each computation runs
as often as hlo.HloModule's multiplicity says.

**FLOPs** of a kernel: those of its instructions and of the computations it
runs, counted as opflops.py says.

**HBM bytes** of a kernel: the bytes it reads and writes in device memory.

- Arrays in other memory spaces (``S(1)``, the TPU's on-chip VMEM, and the
  TPU's scalar and flag spaces) do not count; neither does host memory
  (``S(5)``).
- An operand the kernel only slices (``slice``, ``dynamic-slice``, through
  bitcasts) counts as the slices it reads; the buffer of an in-place
  ``dynamic-update-slice`` counts only its update, written once; an operand
  passed through untouched to the output (or not used) counts nothing, and
  neither does that output.
- An async pair (``copy-start``/``copy-done``, ``*-start``/``*-done``) counts
  once. A collective's buffers count once per execution, with the collective
  (comms.find_collectives): its operand and its result on each device. The
  collectives the TPU compiler clones into compute fusions (collective
  matmuls) add nothing to those fusions.

``program_stats`` sums a step; ``loop_corrected_cost`` sets those sums beside
XLA's one-trip cost analysis.
"""

from __future__ import annotations

import dataclasses
import re

from jaxscale.comms import find_collectives
from jaxscale.hlo import CALL_ATTRS, Array, HloModule, Instruction, arrays, called, parse, shape_bytes
from jaxscale.opflops import GEMM_TARGETS, FlopCounter, is_attention

# ------------------------------------------------------------------ kernels

_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "add-dependency",
         "opt-barrier", "optimization-barrier", "partition-id", "replica-id", "domain", "while", "conditional",
         "call", "copy-done", "send-done", "recv-done", "async-update", "async-done", "iota"}
_FREE_CUSTOM_CALLS = {"AllocateBuffer", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                      "MoveToHost", "MoveToDevice", "AssumeNoAlias", "LayoutConstraint"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
_SLICES = ("slice", "dynamic-slice")
_VIEWS = ("bitcast", "reshape", "get-tuple-element")


def _is_collective(inst: Instruction) -> bool:
    op = inst.opcode[:-6] if inst.opcode.endswith("-start") else inst.opcode
    return op in COLLECTIVES or inst.target in ("AsyncCollectiveStart", "AsyncCollectiveDone")


def is_free(inst: Instruction) -> bool:
    """No launch of its own: bookkeeping, views, the second half of an async pair, control flow."""
    if inst.opcode in _FREE or inst.opcode.endswith("-done"):
        return True
    if inst.opcode == "custom-call":
        return inst.target in _FREE_CUSTOM_CALLS
    if inst.opcode != "fusion" and not _is_collective(inst) and inst.opcode not in ("copy", "copy-start"):
        shape = arrays(inst.shape)
        return bool(shape) and all(not a.dims for a in shape)  # scalar bookkeeping (loop counters)
    return False


def top_level_computations(module: HloModule) -> list[str]:
    """Computations whose instructions are kernels: the entry and what it reaches through while
    loops, conditionals and calls (not fusion bodies, reducers, async wrappers)."""
    out, todo = [], [module.entry] if module.entry else []
    while todo:
        comp = todo.pop()
        if comp in out or comp not in module.computations:
            continue
        out.append(comp)
        for inst in module.computations[comp]:
            if inst.opcode == "while":
                todo += [c for c in (inst.attr("body"), inst.attr("condition")) if c]
            elif inst.opcode == "conditional":
                for attr, value in CALL_ATTRS.findall(inst.attrs):
                    if attr in ("true_computation", "false_computation", "branch_computations"):
                        todo += re.findall(r"[\w.\-]+", value.replace("%", " "))
            elif inst.opcode == "call":
                todo += [c for c in (inst.attr("to_apply"),) if c]
    return out


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of a computation that runs at top level.

    Attributes:
      name: the HLO instruction.
      kind: ``compute`` (fusions, custom calls, copies, unfused ops), ``collective``
        (a synchronous collective), ``collective-start`` / ``collective-done`` (an
        async pair, the TPU's collective-matmul fusions included; ``done`` is free),
        ``loop`` (a while loop: its body and condition are computations of their own),
        ``call`` (a conditional or a call), ``free``.
      flops, hbm_bytes: per execution.
      channel: the collective's channel (pairs a start with its done), or "".
      computation: where it is; ``position``: its index there (schedule order).
    """

    name: str
    kind: str
    flops: int
    hbm_bytes: int
    channel: str
    computation: str
    position: int
    opaque: str = ""  # a kernel whose FLOPs cannot be counted: its target
    attention: bool = False  # a fused attention kernel (cuDNN, Pallas splash/flash)


class _Counter(FlopCounter):
    """FLOPs and HBM bytes of instructions, memoized per computation."""

    def __init__(self, module: HloModule):
        super().__init__(module)
        self.platform = module.platform
        self.users: dict[str, dict[str, list[Instruction]]] = {}
        self._nested_memo: dict[tuple[str, str], int | None] = {}

    # which memory counts
    def hbm(self, a: Array) -> bool:
        if a.space == 0:
            return True
        return self.platform != "tpu" and a.space == 1  # GPU memory space 1: collective (NVSHMEM) buffers in HBM

    def hbm_bytes_of(self, shape: str) -> int:
        return sum(a.nbytes for a in arrays(shape) if self.hbm(a))

    # bytes
    def _users(self, comp: str) -> dict[str, list[Instruction]]:
        if comp not in self.users:
            users: dict[str, list[Instruction]] = {}
            for inst in self.m.computations.get(comp, []):
                for o in inst.operands:
                    users.setdefault(o, []).append(inst)
            self.users[comp] = users
        return self.users[comp]

    def _read_of_parameter(self, comp: str, param: Instruction, full: int, root: Instruction | None,
                           nested: bool = False) -> int:
        """Bytes a fused computation reads of one parameter (``full``: its HBM bytes). In a nested
        fusion (``nested``), what its root passes on is read by the fusion around it, not here."""
        if full == 0:
            return 0
        users = self._users(comp)
        elements = sum(a.elements for a in arrays(param.shape) if self.hbm(a))
        read, frontier, seen = 0, [param], set()
        while frontier:
            node = frontier.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            for user in users.get(node.name, []):
                if user.opcode in _VIEWS:
                    frontier.append(user)
                elif user.opcode in _SLICES and user.operands and user.operands[0] == node.name:
                    # the slice's elements at the operand's width (the TPU compiler folds a convert into it)
                    read += sum(a.elements for a in arrays(user.shape)) * full // max(elements, 1)
                elif user.opcode == "dynamic-update-slice" and user.operands[0] == node.name and \
                        self._reaches_root(comp, user, root):
                    continue  # updated in place: the buffer is not read
                elif user.opcode == "tuple" and user is root and not nested:
                    continue  # passed through untouched
                elif _is_collective(user):
                    continue  # a collective's buffer: counted with the collective
                elif user.opcode == "fusion" and self._nested_reads(user, node.name, full) is not None:
                    read += self._nested_reads(user, node.name, full)
                else:
                    return full
        return min(read, full)

    def _nested_reads(self, fusion: Instruction, operand: str, full: int) -> int | None:
        """Bytes a nested fusion reads of one of its operands (a slice of it, say); None: all of it."""
        callee = next((c for c in called(fusion) if c in self.m.computations), None)
        if callee is None:
            return None
        key = (fusion.name, operand)
        if key in self._nested_memo:
            return self._nested_memo[key]
        params = self._parameters(callee)
        total = 0
        for k, name in enumerate(fusion.operands):
            if name != operand:
                continue
            if k not in params:
                return None
            total += self._read_of_parameter(callee, params[k], full, self.m.root(callee), nested=True)
        result = None if total >= full else total
        self._nested_memo[key] = result
        return result

    def _parameters(self, comp: str) -> dict[int, Instruction]:
        out = {}
        for i in self.m.computations.get(comp, []):
            if i.opcode == "parameter" and i.operands and i.operands[0].isdigit():
                out[int(i.operands[0])] = i
        return out

    def _reaches_root(self, comp: str, inst: Instruction, root: Instruction | None) -> bool:
        """Is inst the root, or a root tuple element, through views?"""
        users = self._users(comp)
        node = inst
        for _ in range(8):
            if node is root:
                return True
            nxt = users.get(node.name, [])
            if len(nxt) != 1 or nxt[0].opcode not in _VIEWS + ("tuple",):
                return False
            node = nxt[0]
            if node.opcode == "tuple":
                return node is root
        return False

    def _written(self, comp: str, node: Instruction | None, leaf: Array) -> int:
        """Bytes written for one output of a fused computation, produced by ``node``."""
        if not self.hbm(leaf):
            return 0
        while node is not None and node.opcode in ("bitcast", "reshape"):
            node = self._in(comp, node.operands[0]) if node.operands else None
        if node is None:
            return leaf.nbytes
        if node.opcode == "parameter" or _is_collective(node):
            return 0  # passed through, or a collective's result (counted with the collective)
        if node.opcode == "dynamic-update-slice" and len(node.operands) > 1:
            update = self._in(comp, node.operands[1])
            return shape_bytes(update.shape) if update is not None else leaf.nbytes
        return leaf.nbytes

    def _in(self, comp: str, name: str) -> Instruction | None:
        inst = self.m.instructions.get(name)
        return inst if inst is not None and inst.computation == comp else None

    def fused_bytes(self, inst: Instruction, comp: str) -> int:
        """HBM bytes of a kernel that runs computation ``comp`` on its operands (a fusion)."""
        params = self._parameters(comp)
        root = self.m.root(comp)
        total = 0
        for k, name in enumerate(inst.operands):
            operand = self.m.instructions.get(name)
            full = self.hbm_bytes_of(operand.shape) if operand is not None else 0
            param = params.get(k)
            total += self._read_of_parameter(comp, param, full, root) if param is not None else full
        leaves = arrays(inst.shape)
        if root is not None and root.opcode == "tuple" and len(root.operands) == len(leaves):
            producers = [self._in(comp, o) for o in root.operands]
        else:
            producers = [root] * len(leaves) if len(leaves) == 1 else [None] * len(leaves)
        total += sum(self._written(comp, p, leaf) for p, leaf in zip(producers, leaves))
        return total

    def unfused_bytes(self, inst: Instruction) -> int:
        """HBM bytes of an unfused op: operands and result, a slice reading its slice and an
        in-place dynamic-update-slice touching its update."""
        op = inst.opcode
        result = self.hbm_bytes_of(inst.shape)
        if op == "custom-call" and inst.target.startswith(GEMM_TARGETS + ("__cudnn$",)):
            leaves = [a for a in arrays(inst.shape) if self.hbm(a)]  # the last leaf is the library's workspace
            result = sum(a.nbytes for a in leaves[:-1]) if len(leaves) > 1 and leaves[-1].dtype == "u8" or \
                len(leaves) > 1 and leaves[-1].dtype == "s8" else result
        if op in _SLICES:
            return 2 * result
        if op == "dynamic-update-slice" and len(inst.operands) > 1:
            update = self.m.instructions.get(inst.operands[1])
            return 2 * self.hbm_bytes_of(update.shape) if update is not None else result
        reads = 0
        for name in inst.operands:
            operand = self.m.instructions.get(name)
            if operand is not None:
                reads += self.hbm_bytes_of(operand.shape)
        return reads + result

    def kernel_bytes(self, inst: Instruction) -> int:
        if is_free(inst) or _is_collective(inst) or inst.opcode == "async-start":
            return 0  # collectives (and async-wrapped work) count with the collective
        if inst.opcode == "copy-start":
            leaves = arrays(inst.shape)  # (destination, source, context)
            source = self.m.instructions.get(inst.operands[0]) if inst.operands else None
            read = self.hbm_bytes_of(source.shape) if source is not None else 0
            return read + (leaves[0].nbytes if leaves and self.hbm(leaves[0]) else 0)
        callees = [c for c in called(inst) if c in self.m.computations]
        if inst.opcode == "fusion" and callees:
            return self.fused_bytes(inst, callees[0])
        return self.unfused_bytes(inst)


def _collective_channel(inst: Instruction, module: HloModule) -> str:
    """The channel of a collective, of the collective a fusion wraps (the TPU's async collective fusions),
    or, for the ``-done`` half of an async pair, of its start."""
    if inst.opcode.endswith("-done") and module.operand(inst) is not None:
        start = _start_of(module.operand(inst), module)
        return _collective_channel(start, module) if start is not None else inst.name
    m = re.search(r"channel_id=(\d+)", inst.attrs)
    if m:
        return m.group(1)
    for callee in called(inst):
        for sub in module.computations.get(callee, []):
            if _is_collective(sub):
                m = re.search(r"channel_id=(\d+)", sub.attrs)
                return m.group(1) if m else sub.name
    return inst.name


def _start_of(inst: Instruction, module: HloModule, depth: int = 0) -> Instruction | None:
    """The start of an async pair a ``-done`` waits on: its operand, or, where the start travelled
    through a loop's state (a pipelined loop), the element of the loop body's root tuple it came from."""
    if depth > 8:
        return None
    if inst.opcode != "get-tuple-element":
        return inst
    index = re.search(r"index=(\d+)", inst.attrs)
    source = module.operand(inst)
    if index is None or source is None:
        return None
    body = source.attr("body") if source.opcode == "while" else (
        source.computation if source.opcode == "parameter" else None)
    root = module.root(body) if body else None
    if root is None or root.opcode != "tuple" or int(index.group(1)) >= len(root.operands):
        return None
    nxt = module.operand(root, int(index.group(1)))
    return _start_of(nxt, module, depth + 1) if nxt is not None else None


def _collective_role(inst: Instruction, module: HloModule) -> str:
    """``collective``, ``collective-start``, ``collective-done`` or "" for a kernel."""
    op = inst.opcode
    if op.endswith("-start") and op[:-6] in COLLECTIVES:
        return "collective-start"
    if op.endswith("-done") and op[:-5] in COLLECTIVES:
        return "collective-done"
    if op in COLLECTIVES:
        return "collective"
    if op == "async-start":
        if any(_is_collective(s) for c in called(inst) for s in module.computations.get(c, [])):
            return "collective-start"
        return ""
    if op == "async-done":
        start = module.instructions.get(inst.operands[0]) if inst.operands else None
        return "collective-done" if start is not None and _collective_role(start, module) else ""
    if op == "fusion":
        targets = {s.target for c in called(inst) for s in module.computations.get(c, []) if s.opcode == "custom-call"}
        if "AsyncCollectiveStart" in targets:
            return "collective-start"
        if "AsyncCollectiveDone" in targets:
            return "collective-done"
        # A fusion that runs a collective of its own (the TPU's all-reduce-scatter) is one, synchronous; a
        # clone of a collective whose start is elsewhere (a collective matmul's loop body) is compute.
        inner = [sub for c in called(inst) for sub in module.computations.get(c, []) if _is_collective(sub)]
        if inner and _collective_channel(inner[0], module) not in _started_channels(module):
            return "collective"
    return ""


def _started_channels(module: HloModule) -> set[str]:
    """Channels of the collectives the TPU compiler starts with an AsyncCollectiveStart (cached on the module)."""
    cached = module._local.get("__started__")
    if cached is None:
        cached = set()
        for insts in module.computations.values():
            if any(i.opcode == "custom-call" and i.target == "AsyncCollectiveStart" for i in insts):
                cached |= {_collective_channel(i, module) for i in insts if _is_collective(i) and
                           i.opcode != "custom-call"}
        module._local["__started__"] = cached
    return cached


def kernels(hlo: str | HloModule, counter: _Counter | None = None) -> dict[str, list[Kernel]]:
    """The kernels of every top-level computation, in schedule order, keyed by computation."""
    module = parse(hlo)
    counter = counter or _Counter(module)
    out: dict[str, list[Kernel]] = {}
    for comp in top_level_computations(module):
        items = []
        for position, inst in enumerate(module.computations[comp]):
            role = _collective_role(inst, module)
            if inst.opcode == "while":
                kind = "loop"
            elif inst.opcode in ("conditional", "call"):
                kind = "call"
            elif role:
                kind = role
            elif is_free(inst):
                kind = "free"
            else:
                kind = "compute"
            flops, opaque, how = counter.instruction_flops(inst) if kind not in ("free", "loop", "call") \
                else (0, (), ())
            for h in how:
                counter.counted[h] = counter.counted.get(h, 0) + module.multiplicity.get(comp, 0)
            items.append(Kernel(inst.name, kind, flops, counter.kernel_bytes(inst) if kind == "compute" else 0,
                                _collective_channel(inst, module) if role else "", comp, position,
                                ",".join(sorted(set(opaque))), kind == "compute" and is_attention(inst)))
        out[comp] = items
    return out


# --------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class ProgramStats:
    """What one step of a per-device program runs, every loop trip counted.

    Attributes:
      kernels: kernel launches per step (see the module docstring for what is free).
      flops: FLOPs per step: matmul-class kernels (dots, convolutions, gemm custom
        calls, fused attention, Pallas kernels) plus elementwise work.
      matmul_flops: the matmul-class part of ``flops``.
      attention_flops: the fused attention kernels' part of ``flops`` (the kernels XLA's own
        cost analysis does not see even where it runs).
      hbm_bytes: bytes read and written in device memory per step, kernels and collectives.
      collective_hbm_bytes: the collectives' part of ``hbm_bytes``.
      loops: while loops; ``unknown_trip_counts``: those whose trip count could not be
        read (their bodies were counted once).
      opaque_kernels: custom-call targets whose FLOPs could not be counted.
      counted_kernels: how custom kernels were counted, with calls per step.
      flops_trusted: False when a loop's trip count or a kernel's FLOPs could not be read.
      flops_note: why not, or how custom kernels were counted ("" when nothing to say).
    """

    kernels: int
    flops: int
    matmul_flops: int
    attention_flops: int
    hbm_bytes: int
    collective_hbm_bytes: int
    loops: int
    unknown_trip_counts: int
    opaque_kernels: tuple[str, ...]
    counted_kernels: tuple[tuple[str, int], ...]
    flops_trusted: bool
    flops_note: str


def _matmul_only(counter: _Counter, inst: Instruction) -> int:
    """The matmul-class part of an instruction's FLOPs."""
    op = inst.opcode
    if op in ("dot", "convolution", "custom-call"):
        f, _, _ = counter.instruction_flops(inst)
        return f
    if op in ("fusion", "async-start", "call"):
        return sum(_matmul_only(counter, sub) for c in called(inst) + ([inst.attr("to_apply") or ""] if op == "call"
                                                                      else [])
                   for sub in counter.m.computations.get(c, []))
    return 0


def program_stats(hlo_text: str | HloModule, n_devices: int | None = None) -> ProgramStats:
    """Kernels, FLOPs and HBM bytes of one step of a per-device program (optimized HLO).

    Args:
      hlo_text: the optimized HLO text (``compiled.as_text()``) or a parsed HloModule.
      n_devices: devices of the step (for the collectives' replica groups); default: read
        off the module's largest replica group.
    """
    module = parse(hlo_text)
    counter = _Counter(module)
    per_comp = kernels(module, counter)
    n_kernels, flops, matmul, attention, nbytes, loops = 0, 0, 0, 0, 0, 0
    opaque: set[str] = set()
    for comp, items in per_comp.items():
        times = module.multiplicity.get(comp, 0)
        insts = module.computations[comp]
        for k in items:
            if k.kind == "loop":
                loops += 1
            if k.kind in ("free", "loop", "call", "collective-done"):
                continue
            n_kernels += times
            flops += times * k.flops
            attention += times * k.flops if k.attention else 0
            matmul += times * _matmul_only(counter, insts[k.position])
            nbytes += times * k.hbm_bytes
            if k.opaque:
                opaque |= set(k.opaque.split(","))
    collective_bytes = 0
    for c in find_collectives(module, n_devices or 1):
        g = max(c.group_size, 1)
        local = {"all-gather": c.full_bytes / g + c.full_bytes, "reduce-scatter": c.full_bytes + c.full_bytes / g}
        collective_bytes += int(local.get(c.kind, 2 * c.full_bytes)) * c.times
    notes = []
    if module.unknown_trip_counts:
        notes.append(f"{module.unknown_trip_counts} loop(s) with no readable trip count")
    if opaque:
        notes.append(f"custom-call kernels whose FLOPs cannot be counted: {', '.join(sorted(opaque))}")
    trusted = not notes
    counted = tuple(sorted(counter.counted.items()))
    if counted:
        notes.append("FLOPs of " + ", ".join(f"{n} {how}" for how, n in counted) + " counted from the HLO")
    return ProgramStats(kernels=n_kernels, flops=flops, matmul_flops=matmul, attention_flops=attention,
                        hbm_bytes=nbytes + collective_bytes,
                        collective_hbm_bytes=collective_bytes, loops=loops,
                        unknown_trip_counts=module.unknown_trip_counts, opaque_kernels=tuple(sorted(opaque)),
                        counted_kernels=counted, flops_trusted=trusted, flops_note="; ".join(notes))


def total_matmul_flops(hlo_text: str | HloModule) -> int:
    """Matmul-class FLOPs of one execution of a module, every loop trip counted."""
    return program_stats(hlo_text).matmul_flops


@dataclasses.dataclass(frozen=True)
class LoopCorrection:
    """Loops of a module and how far XLA's one-trip cost analysis falls short of the whole step."""

    loops: int
    unknown_trip_counts: int
    extra_flops: float
    extra_bytes: float


def loop_corrected_cost(cost: dict, hlo_text: str) -> tuple[float | None, float | None, LoopCorrection]:
    """(FLOPs, HBM bytes) of one step of a per-device program, every loop trip and kernel counted.

    Both come from the optimized HLO (program_stats), whatever the backend, so they
    are also there where the compiler gives no cost analysis (deviceless GPU
    compiles). The FLOPs leave out the fused attention kernels (cuDNN, Pallas
    attention), which callers add as prediction.hidden_flops, as they always did for
    XLA's cost analysis; they are None where they cannot be trusted (an unreadable
    trip count, a kernel that cannot be counted). ``cost`` is XLA's cost_analysis
    dict: the correction reports how far the HLO count is from XLA's one-trip figures.
    """
    stats = program_stats(hlo_text)
    flops = float(stats.flops - stats.attention_flops) if stats.flops_trusted else None
    one_trip_flops, one_trip_bytes = cost.get("flops"), cost.get("bytes accessed")
    correction = LoopCorrection(stats.loops, stats.unknown_trip_counts,
                                (flops or 0.0) - float(one_trip_flops or 0.0),
                                float(stats.hbm_bytes) - float(one_trip_bytes or 0.0))
    return flops, float(stats.hbm_bytes), correction
