"""FLOPs of one optimized-HLO instruction, counting what XLA's cost analysis counts and what it cannot see.

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
  cannot be counted: the counter names their targets (hlo_cost.ProgramStats'
  ``flops_note`` says so and ``flops_trusted`` is False);
- elementwise work as XLA's HloCostAnalysis counts it: one FLOP per result
  element of arithmetic ops (transcendentals such as exp, log, tanh and rsqrt
  are not FLOPs), one per reducer application of a reduce, one per result
  element of a reduce-window (XLA's cost analysis counts the whole window for
  each result: on the TPU, whose softmax takes a row's maximum as a
  reduce-window over twice the row, that alone is a quarter of the step).

A fusion, async wrapper or call counts the FLOPs of the computations it runs
(``FlopCounter``).
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxscale.flops import attention_call_flops
from jaxscale.hlo import Array, HloModule, Instruction, arrays, backend_config, called, parse

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


GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
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


def is_attention(inst: Instruction) -> bool:
    """A fused attention kernel: cuDNN's ``__cudnn$fmha*`` calls, Pallas splash or flash attention."""
    if inst.opcode != "custom-call":
        return False
    if inst.target.startswith("__cudnn$fmha"):
        return True
    return inst.target in OPAQUE_KERNELS and bool(re.search(r"splash|flash|attention|_mha_|_mqa_",
                                                             _kernel_name(inst)))


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


# ------------------------------------------------------------ per computation


class FlopCounter:
    """FLOPs of instructions and of the computations they run, memoized per computation."""

    def __init__(self, module: HloModule):
        self.m = module
        self._flops_memo: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {}
        self.counted: dict[str, int] = {}  # how custom kernels were counted: description -> calls

    def instruction_flops(self, inst: Instruction) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        """(FLOPs, targets that cannot be counted, how custom kernels were counted) of one instruction."""
        op = inst.opcode
        if op == "dot":
            return dot_flops(inst, self.m), (), ()
        if op == "convolution":
            return convolution_flops(inst, self.m), (), ()
        if op == "custom-call":
            target = inst.target
            if target.startswith(GEMM_TARGETS):
                flops = gemm_flops(inst, self.m)
                return (flops, (), ("cuBLAS gemm",)) if flops is not None else (0, (target,), ())
            if target.startswith("__cudnn$fmha"):
                call = _cudnn_attention(inst, self.m, 1)
                return (_attention_flops(call), (), ("cuDNN attention",)) if call else (0, (target,), ())
            if target in OPAQUE_KERNELS:
                flops, how = _pallas_flops(inst, self.m)
                return (flops, (), (f"{_kernel_name(inst)} ({how})",)) if flops is not None else (0, (target,), ())
            total, opaque, how = 0, (), ()
            for callee in called(inst):
                f, o, h = self.computation_flops(callee)
                total, opaque, how = total + f, opaque + o, how + h
            return total, opaque, how
        if op in ("fusion", "async-start", "call"):
            total, opaque, how = 0, (), ()
            for callee in called(inst) + ([inst.attr("to_apply")] if op == "call" else []):
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

