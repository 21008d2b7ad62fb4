"""What XLA's cost analysis misses: the matmul FLOPs and bytes of loop trips after the first.

XLA's ``cost_analysis()`` counts the body of a while loop once, whatever its
trip count. A model whose layers are one scanned layer (a loop of n_layers
trips) is then undercounted by nearly n_layers, and so are the TPU's
collective-matmul loops (``windowed_dot_general``). Deviceless GPU compiles
return no cost analysis at all. This module reads the optimized program
instead, on the call graph that comms.HloModule builds (how many times one
step runs each computation, loop trip counts included):

- matmul FLOPs: for a ``dot``, 2 × result elements × the contracted size of
  the left operand; for a ``convolution`` (how the TPU compiler prints
  matmuls), 2 × batch × output features × input features per group × the
  number of (output, window) position pairs that fall inside the unpadded
  input along every spatial dimension, so the padding of a batch dimension
  expressed as a window is not counted;
- bytes: what a loop trip's top-level instructions read and write (operands
  plus result), a stacked array of the loop counting the one slice a trip
  touches and an in-place dynamic-update-slice its update only. An estimate:
  XLA's own byte count also looks inside fusions.

``loop_corrected_cost`` adds, for every while loop, (runs per step − 1) × its
body's own FLOPs and bytes to XLA's figures.
"""

from __future__ import annotations

import dataclasses
import re

from jaxscale.comms import _ARRAY, _DTYPE_BYTES, HloModule, Instruction

_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
             "replica-id", "iota", "while"}


def _dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def dot_flops(inst: Instruction, module: HloModule) -> int:
    """2 × result elements × contracted size of a dot; 0 when the shapes cannot be read."""
    result = _dims(inst.shape)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    lhs = module.instructions.get(inst.operands[0]) if inst.operands else None
    lhs_dims = _dims(lhs.shape) if lhs else []
    if not result or not contracting or not lhs_dims:
        return 0
    k = _prod(lhs_dims[0][1][int(a)] for a in contracting.group(1).split(",") if a)
    return 2 * _prod(result[0][1]) * k


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
    lhs_i, rhs_i = (module.instructions.get(o) for o in inst.operands[:2])
    out, lhs, rhs = _dims(inst.shape), _dims(lhs_i.shape) if lhs_i else [], _dims(rhs_i.shape) if rhs_i else []
    if not out or not lhs or not rhs:
        return 0
    out, lhs, rhs = out[0][1], lhs[0][1], rhs[0][1]
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
    groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
    in_features = rhs[r_lab.index("i")]
    # rhs "i" is already the input features of one group, so feature groups need no division
    del groups
    return 2 * out[o_lab.index("b")] * out[o_lab.index("f")] * in_features * pairs


def instruction_flops(inst: Instruction, module: HloModule) -> int:
    if inst.opcode == "dot":
        return dot_flops(inst, module)
    if inst.opcode == "convolution":
        return convolution_flops(inst, module)
    return 0


def _callees(inst: Instruction) -> list[str]:
    out = []
    for attr, value in re.findall(r"\b(calls|body|condition|true_computation|false_computation|"
                                  r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)", inst.attrs):
        out += re.findall(r"[\w.\-]+", value.replace("%", " "))
    return out


def computation_flops(module: HloModule, name: str, into_loops: bool = True, _memo: dict | None = None) -> int:
    """Matmul FLOPs of one run of a computation and what it calls.

    ``into_loops``: include while loops, each body times its trip count; else
    stop at while instructions (the computation's own work only).
    """
    memo = {} if _memo is None else _memo
    key = (name, into_loops)
    if key in memo:
        return memo[key]
    memo[key] = 0  # guards against cycles
    total = 0
    for inst in module.computations.get(name, []):
        total += instruction_flops(inst, module)
        if inst.opcode == "while":
            if not into_loops:
                continue
            body = re.search(r"\bbody=%?([\w.\-]+)", inst.attrs)
            if body and body.group(1) in module.computations:
                total += (module.trip_count(inst) or 1) * computation_flops(module, body.group(1), True, memo)
            continue
        for callee in _callees(inst):
            if callee in module.computations:
                total += computation_flops(module, callee, into_loops, memo)
    memo[key] = total
    return total


def total_matmul_flops(hlo_text: str | HloModule) -> int:
    """Matmul FLOPs of one execution of a module, every loop trip counted."""
    module = hlo_text if isinstance(hlo_text, HloModule) else HloModule.parse(hlo_text)
    return computation_flops(module, module.entry) if module.entry else 0


def _trip_bytes(shape: str, trip: int) -> float:
    total = 0.0
    for dtype, dims in _dims(shape):
        n = _prod(dims) * _DTYPE_BYTES[dtype]
        total += n / trip if dims and dims[0] == trip and trip > 1 else n
    return total


def _body_bytes(module: HloModule, name: str, trip: int) -> float:
    total = 0.0
    for inst in module.computations.get(name, []):
        if inst.opcode in _FREE_OPS:
            continue
        operands = list(inst.operands)
        if inst.opcode == "dynamic-update-slice" or "dynamic-update-slice" in inst.name:
            operands = operands[1:]  # updated in place: only the update is read and written
        total += _trip_bytes(inst.shape, trip)
        total += sum(_trip_bytes(module.instructions[o].shape, trip) for o in operands if o in module.instructions)
    return total


@dataclasses.dataclass(frozen=True)
class LoopCorrection:
    """What cost_analysis leaves out of a module's while loops (the trips after the first)."""

    loops: int
    unknown_trip_counts: int
    extra_flops: float
    extra_bytes: float


def loop_correction(hlo_text: str | HloModule) -> LoopCorrection:
    """FLOPs and bytes of every loop body's runs beyond the one cost_analysis counts.

    A body runs multiplicity(body) times per step (its caller's runs × trips,
    nested loops included); cost_analysis counts it once.
    """
    module = hlo_text if isinstance(hlo_text, HloModule) else HloModule.parse(hlo_text)
    loops, flops, bytes_, memo = 0, 0.0, 0.0, {}
    for name, insts in module.computations.items():
        if module.multiplicity.get(name, 0) == 0:
            continue
        for inst in insts:
            if inst.opcode != "while":
                continue
            body = re.search(r"\bbody=%?([\w.\-]+)", inst.attrs)
            trip = module.trip_count(inst)
            if not body or not trip:
                continue
            extra = module.multiplicity.get(name, 0) * trip - 1
            if extra <= 0:
                continue
            loops += 1
            flops += extra * computation_flops(module, body.group(1), False, memo)
            bytes_ += extra * _body_bytes(module, body.group(1), trip)
    return LoopCorrection(loops, module.unknown_trip_counts, flops, bytes_)


def loop_corrected_cost(cost: dict, hlo_text: str) -> tuple[float | None, float | None, LoopCorrection]:
    """(flops, bytes accessed) of a per-device program with every loop trip counted.

    ``cost`` is XLA's cost_analysis dict. Where it has no FLOPs (deviceless GPU
    compiles), the matmul FLOPs of the HLO stand in and bytes stay None.
    """
    module = HloModule.parse(hlo_text)
    correction = loop_correction(module)
    flops = cost.get("flops")
    bytes_ = cost.get("bytes accessed")
    if flops is None:
        dots = total_matmul_flops(module)
        return (float(dots) if dots else None), None, correction
    flops = float(flops) + correction.extra_flops
    if bytes_ is not None:
        bytes_ = float(bytes_) + correction.extra_bytes
    return flops, bytes_, correction
