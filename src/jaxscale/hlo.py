"""Optimized HLO → what one step runs: kernels, FLOPs and HBM bytes per kernel, loop trips.

One parser for the whole package (comms.py reads collectives off the same
``HloModule``). A module is read as computations of instructions, with the call
graph between them (fusions, async wrappers, while bodies and conditions,
branches, calls). Every computation gets a multiplicity: how many times one
step runs it. A while body runs its trip count times; the count comes from
``known_trip_count`` in the while's backend_config (the CPU and GPU compilers
print it) or, where the compiler does not print it (the TPU compiler), from the
loop's condition ``i < N``, the constant the counter starts from and the step
the body adds. Each branch of a conditional is counted as if it ran.

A **kernel** is a top-level instruction of a computation that runs at top
level (the entry, while bodies and conditions, conditional branches, called
computations; not fusion bodies, reducers or async wrappers): fusions, custom
calls, copies, collectives and any unfused op, one launch each. Parameters,
tuples, get-tuple-element, bitcasts, constants, the ``-done`` half of an async
pair, while/conditional/call themselves and scalar bookkeeping (a non-fusion op
with a scalar result, such as a loop counter) are free.

**FLOPs** of a kernel, counting what XLA's cost analysis counts and what it
cannot see:

- ``dot``: 2 × result elements × contracted size; ``convolution`` (how the TPU
  compiler prints matmuls): 2 × batch × output features × input features per
  group × the (output, window) position pairs inside the unpadded input;
- cuBLAS and cuBLASLt gemm custom calls (``__cublas$gemm``,
  ``__cublas$lt$matmul…``): as a dot, from the dot dimension numbers in the
  call's backend_config; Triton and cuDNN gemm fusions through the dot in their
  fused computation;
- cuDNN fused attention (``__cudnn$fmha*``): from the score shape in the
  call's backend_config (flops.attention_call_flops);
- Pallas kernels (``tpu_custom_call``): the kernel's own cost estimate in its
  backend_config where it has one; the splash-attention kernels from their
  shapes and block sizes, as a causal mask (the mask's blocks are constants the
  HLO text does not print); any other kernel without a cost estimate, and
  Pallas/Mosaic kernels on GPU (``__gpu$xla.gpu.triton``, ``mosaic_gpu``),
  cannot be counted: ``ProgramStats.flops_note`` says so and
  ``flops_trusted`` is False;
- elementwise work as XLA's HloCostAnalysis counts it: one FLOP per result
  element of arithmetic ops (transcendentals such as exp, log, tanh and rsqrt
  are not FLOPs), one per reducer application of a reduce, one per result
  element of a reduce-window (XLA's cost analysis counts the whole window for
  each result: on the TPU, whose softmax takes a row's maximum as a
  reduce-window over twice the row, that alone is a quarter of the step).

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

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def target(self) -> str:
        """A custom call's target ("" for other opcodes)."""
        m = re.search(r'custom_call_target="([^"]+)"', self.attrs)
        return m.group(1) if m else ""


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


def parse(hlo: str | HloModule) -> HloModule:
    """The module of an HLO text. The FLOP count, the communication model and the roofline each read a step's
    program: the last few texts are parsed once (a module is never changed after parsing)."""
    return hlo if isinstance(hlo, HloModule) else _parse_text(hlo)


@functools.lru_cache(maxsize=4)
def _parse_text(text: str) -> HloModule:
    return HloModule.parse(text)


# ------------------------------------------------------------ matmul FLOPs


def _first(inst: Instruction | None) -> Array | None:
    a = arrays(inst.shape) if inst is not None else []
    return a[0] if a else None


def dot_flops(inst: Instruction, module: HloModule) -> int:
    """2 × result elements × contracted size of a dot; 0 when the shapes cannot be read."""
    result = _first(inst)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    lhs = _first(module.instructions.get(inst.operands[0])) if inst.operands else None
    if result is None or not contracting or lhs is None:
        return 0
    k = math.prod(lhs.dims[int(a)] for a in contracting.group(1).split(",") if a)
    return 2 * result.elements * k


def _valid_pairs(out_size: int, in_size: int, window: int, stride: int, pad_low: int, w_dilation: int) -> int:
    """(output, window) position pairs whose input index lies inside the unpadded input."""
    total = 0
    for o in range(out_size):
        for w in range(window):
            i = o * stride + w * w_dilation - pad_low
            total += 0 <= i < in_size
    return total


def convolution_flops(inst: Instruction, module: HloModule) -> int:
    """Multiply-adds × 2 of a convolution over the unpadded input; 0 when it cannot be read."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    if not labels or len(inst.operands) < 2:
        return 0
    out = _first(inst)
    lhs, rhs = (_first(module.instructions.get(o)) for o in inst.operands[:2])
    if out is None or lhs is None or rhs is None:
        return 0
    out, lhs, rhs = out.dims, lhs.dims, rhs.dims
    l_lab, r_lab, o_lab = labels.groups()
    if not (len(l_lab) == len(lhs) and len(r_lab) == len(rhs) and len(o_lab) == len(out)):
        return 0
    spatial = sorted(c for c in o_lab if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    fields = dict(re.findall(r"(\w+)=([\w\-_]+)", window.group(1))) if window else {}

    def per_dim(key: str, default: int) -> list[int]:
        if key not in fields:
            return [default] * len(spatial)
        return [int(v) for v in fields[key].split("x")]

    strides, w_dil = per_dim("stride", 1), per_dim("rhs_dilate", 1)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else \
        [(0, 0)] * len(spatial)
    pairs = 1
    for k, d in enumerate(spatial):
        pairs *= _valid_pairs(out[o_lab.index(d)], lhs[l_lab.index(d)], rhs[r_lab.index(d)], strides[k],
                              pads[k][0], w_dil[k])
    # rhs "i" is already the input features of one group, so feature groups need no division
    return 2 * out[o_lab.index("b")] * out[o_lab.index("f")] * rhs[r_lab.index("i")] * pairs


_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
# Custom calls that run user-written kernels: their arithmetic is known only from the kernel's own cost estimate.
OPAQUE_KERNELS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")


def gemm_flops(inst: Instruction, module: HloModule) -> int | None:
    """FLOPs of a cuBLAS/cuBLASLt gemm custom call: a dot, from the dimension numbers in its backend_config."""
    config = backend_config(inst.attrs)
    gemm = config.get("gemm_backend_config", config)
    numbers = gemm.get("dot_dimension_numbers")
    result = _first(inst)  # the output; cuBLAS calls return (output, workspace)
    lhs = _first(module.instructions.get(inst.operands[0])) if inst.operands else None
    if not numbers or result is None or lhs is None:
        return None
    contracting = [int(d) for d in numbers.get("lhs_contracting_dimensions", [])]
    if any(d >= len(lhs.dims) for d in contracting):
        return None
    return 2 * result.elements * math.prod(lhs.dims[d] for d in contracting)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A fused attention kernel in the HLO (cuDNN ``__cudnn$fmha*`` custom calls, Pallas splash kernels)."""

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


def _cudnn_attention(inst: Instruction, module: HloModule, times: int) -> AttentionCall | None:
    """Dimensions of a cuDNN fused-attention call: ``intermediate_tensor_shape`` is the score
    matrix [B, N, T, S]; the head dimension is the last axis of the first operand (Q, in BTNH or
    BNTH layout). ``mask_type`` CAUSAL (or PADDING_CAUSAL) marks a causal kernel."""
    config = backend_config(inst.attrs).get("cudnn_fmha_backend_config", {})
    dims = [int(d) for d in config.get("intermediate_tensor_shape", {}).get("dimensions", [])]
    q = _first(module.instructions.get(inst.operands[0])) if inst.operands else None
    if len(dims) != 4 or q is None:
        return None
    mask = str(config.get("mask_type", ""))
    return AttentionCall(inst.target, *dims, head_dim=q.dims[-1], backward="Backward" in inst.target,
                         causal="CAUSAL" in mask, flash=bool(config.get("is_flash_attention", True)), times=times)


def attention_calls(hlo: str | HloModule) -> list[AttentionCall]:
    """The cuDNN fused-attention custom calls of a module, with executions per step."""
    module = parse(hlo)
    out = []
    for comp, insts in module.computations.items():
        for inst in insts:
            if inst.opcode == "custom-call" and inst.target.startswith("__cudnn$fmha"):
                call = _cudnn_attention(inst, module, module.multiplicity.get(comp, 1))
                if call:
                    out.append(call)
    return out


def _attention_flops(call: AttentionCall) -> int:
    from jaxscale.flops import attention_call_flops

    return attention_call_flops(call.batch, call.heads, call.q_len, call.kv_len, call.head_dim,
                                backward=call.backward, causal=call.causal, flash=call.flash)


def _kernel_name(inst: Instruction) -> str:
    m = re.search(r'kernel_name="?([\w.\-]+)', inst.attrs)
    if m:
        return m.group(1)
    m = re.search(r'op_name="[^"]*/(splash_[\w]+|[\w]*flash[\w]*)/[^"/]*pallas_call', inst.attrs)
    return m.group(1) if m else f"{inst.target} {inst.name}"


def _splash_flops(inst: Instruction, module: HloModule) -> int | None:
    """FLOPs of a Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention),
    from its shapes and block sizes, as a causal mask: the kernel computes every (q, kv) block at or
    below the diagonal, so n(n+1)/2 of the n² blocks of size block_q × block_kv (n = T / block_q).

    Forward: QKᵀ and PV; dq: QKᵀ (recomputed), dP = dO·Vᵀ, dQ = dS·K; dkv: QKᵀ, dP, dV = Pᵀ·dO, dK = dSᵀ·Q.
    """
    name = _kernel_name(inst)
    phase = next((p for p in ("fwd", "dkv", "dq") if f"_{p}" in name), None)
    ops = [a for o in inst.operands for a in arrays(module.instructions[o].shape)] if all(
        o in module.instructions for o in inst.operands) else []
    big = [a for a in ops if len(a.dims) >= 3 and a.dtype not in ("s8", "s32", "pred")]
    if phase is None or len(big) < 2:
        return None
    q, k = big[0], big[1]
    batch_heads, q_len, head_dim = math.prod(q.dims[:-2]), q.dims[-2], q.dims[-1]
    kv_len = k.dims[-2]
    # the kernel's block sizes (block_q and block_kv, or block_q_dq / block_q_dkv) from its xprof metadata
    suffix = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}[phase]
    blocks = {k: int(v) for k, v in re.findall(rf'\\"(block_q|block_kv){suffix}\\": (\d+)', inst.attrs)}
    block = blocks.get("block_q") if blocks.get("block_q") == blocks.get("block_kv") else None
    n = q_len // block if block and q_len % block == 0 and q_len == kv_len else None
    fraction = (n * (n + 1) / 2) / (n * n) if n else 0.5
    matmuls = {"fwd": 2, "dq": 3, "dkv": 4}[phase]
    return int(matmuls * 2 * batch_heads * q_len * kv_len * head_dim * fraction)


def _pallas_flops(inst: Instruction, module: HloModule) -> tuple[int | None, str]:
    """(FLOPs, how they were counted) of a Pallas/Mosaic kernel; FLOPs None when they cannot be known."""
    config = backend_config(inst.attrs)
    estimate = config.get("custom_call_config", {}).get("cost_estimate") or config.get("cost_estimate")
    if isinstance(estimate, dict) and "flops" in estimate:
        return int(estimate["flops"]), "its cost estimate"
    if "splash_" in _kernel_name(inst):
        flops = _splash_flops(inst, module)
        if flops is not None:
            return flops, "its shapes as causal splash attention"
    return None, ""


# --------------------------------------------------------- elementwise FLOPs

_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "sqrt",
                   "cbrt", "rsqrt", "tanh", "sine", "cosine", "tan", "atan2", "erf"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select",
                "and", "or", "xor", "not", "clamp", "remainder", "sign", "floor", "ceil", "round-nearest-afz",
                "round-nearest-even", "convert", "is-finite", "shift-left", "shift-right-arithmetic",
                "shift-right-logical", "popcnt", "count-leading-zeros", "real", "imag", "complex"}


def _reducer_flops(module: HloModule, name: str | None) -> int:
    insts = module.computations.get(name or "", [])
    return max(sum(1 for i in insts if i.opcode in _ELEMENTWISE), 1)


def _elementwise_flops(inst: Instruction, module: HloModule) -> int:
    if inst.opcode in _ELEMENTWISE:
        a = _first(inst)
        return a.elements if a else 0
    if inst.opcode == "reduce":
        ins = [_first(module.instructions.get(o)) for o in inst.operands[:max(len(inst.operands) // 2, 1)]]
        outs = arrays(inst.shape)
        n_in = ins[0].elements if ins and ins[0] else 0
        n_out = outs[0].elements if outs else 0
        return max(n_in - n_out, 0) * _reducer_flops(module, inst.attr("to_apply"))
    if inst.opcode == "reduce-window":  # one reducer application per output (a running max costs O(1) each)
        out = _first(inst)
        return (out.elements if out else 0) * _reducer_flops(module, inst.attr("to_apply"))
    return 0


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
                for attr, value in _CALL_ATTRS.findall(inst.attrs):
                    if attr in ("true_computation", "false_computation", "branch_computations"):
                        todo += re.findall(r"[\w.\-]+", value.replace("%", " "))
            elif inst.opcode == "call":
                todo += [c for c in (inst.attr("to_apply"),) if c]
    return out


def _called(inst: Instruction) -> list[str]:
    """Computations a kernel runs inside itself (fusion bodies, nested fusions)."""
    out = []
    for attr, value in _CALL_ATTRS.findall(inst.attrs):
        if attr in ("calls", "called_computations"):
            out += re.findall(r"[\w.\-]+", value.replace("%", " "))
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


class _Counter:
    """FLOPs and HBM bytes of instructions, memoized per computation."""

    def __init__(self, module: HloModule):
        self.m = module
        self.platform = module.platform
        self._flops_memo: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {}
        self.counted: dict[str, int] = {}  # how custom kernels were counted: description -> calls
        self.users: dict[str, dict[str, list[Instruction]]] = {}
        self._nested_memo: dict[tuple[str, str], int | None] = {}

    # which memory counts
    def hbm(self, a: Array) -> bool:
        if a.space == 0:
            return True
        return self.platform != "tpu" and a.space == 1  # GPU memory space 1: collective (NVSHMEM) buffers in HBM

    def hbm_bytes_of(self, shape: str) -> int:
        return sum(a.nbytes for a in arrays(shape) if self.hbm(a))

    # FLOPs
    def instruction_flops(self, inst: Instruction) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        """(FLOPs, targets that cannot be counted, how custom kernels were counted) of one instruction."""
        op = inst.opcode
        if op == "dot":
            return dot_flops(inst, self.m), (), ()
        if op == "convolution":
            return convolution_flops(inst, self.m), (), ()
        if op == "custom-call":
            target = inst.target
            if target.startswith(_GEMM_TARGETS):
                flops = gemm_flops(inst, self.m)
                return (flops, (), ("cuBLAS gemm",)) if flops is not None else (0, (target,), ())
            if target.startswith("__cudnn$fmha"):
                call = _cudnn_attention(inst, self.m, 1)
                return (_attention_flops(call), (), ("cuDNN attention",)) if call else (0, (target,), ())
            if target in OPAQUE_KERNELS:
                flops, how = _pallas_flops(inst, self.m)
                return (flops, (), (f"{_kernel_name(inst)} ({how})",)) if flops is not None else (0, (target,), ())
            total, opaque, how = 0, (), ()
            for callee in _called(inst):
                f, o, h = self.computation_flops(callee)
                total, opaque, how = total + f, opaque + o, how + h
            return total, opaque, how
        if op in ("fusion", "async-start", "call"):
            total, opaque, how = 0, (), ()
            for callee in _called(inst) + ([inst.attr("to_apply")] if op == "call" else []):
                if callee:
                    f, o, h = self.computation_flops(callee)
                    total, opaque, how = total + f, opaque + o, how + h
            return total, opaque, how
        return _elementwise_flops(inst, self.m), (), ()

    def computation_flops(self, name: str) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        if name in self._flops_memo:
            return self._flops_memo[name]
        self._flops_memo[name] = (0, (), ())  # guards against cycles
        total, opaque, how = 0, (), ()
        for inst in self.m.computations.get(name, []):
            f, o, h = self.instruction_flops(inst)
            total, opaque, how = total + f, opaque + o, how + h
        self._flops_memo[name] = (total, opaque, how)
        return total, opaque, how

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
        callee = next((c for c in _called(fusion) if c in self.m.computations), None)
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
        if op == "custom-call" and inst.target.startswith(_GEMM_TARGETS + ("__cudnn$",)):
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
        callees = [c for c in _called(inst) if c in self.m.computations]
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
    for callee in _called(inst):
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
        if any(_is_collective(s) for c in _called(inst) for s in module.computations.get(c, [])):
            return "collective-start"
        return ""
    if op == "async-done":
        start = module.instructions.get(inst.operands[0]) if inst.operands else None
        return "collective-done" if start is not None and _collective_role(start, module) else ""
    if op == "fusion":
        targets = {s.target for c in _called(inst) for s in module.computations.get(c, []) if s.opcode == "custom-call"}
        if "AsyncCollectiveStart" in targets:
            return "collective-start"
        if "AsyncCollectiveDone" in targets:
            return "collective-done"
        # A fusion that runs a collective of its own (the TPU's all-reduce-scatter) is one, synchronous; a
        # clone of a collective whose start is elsewhere (a collective matmul's loop body) is compute.
        inner = [sub for c in _called(inst) for sub in module.computations.get(c, []) if _is_collective(sub)]
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


def is_attention(inst: Instruction) -> bool:
    """A fused attention kernel: cuDNN's ``__cudnn$fmha*`` calls, Pallas splash or flash attention."""
    if inst.opcode != "custom-call":
        return False
    if inst.target.startswith("__cudnn$fmha"):
        return True
    return inst.target in OPAQUE_KERNELS and bool(re.search(r"splash|flash|attention|_mha_|_mqa_",
                                                             _kernel_name(inst)))


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
        return sum(_matmul_only(counter, sub) for c in _called(inst) + ([inst.attr("to_apply") or ""] if op == "call"
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
    from jaxscale.comms import find_collectives

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
    attention), which callers add as measure.hidden_flops, as they always did for
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
