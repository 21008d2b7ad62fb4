"""Analytic FLOPs and parameter counts, the table of device peaks, and MFU.

Everything here is pure arithmetic on integers and floats: no JAX calls, so it
can be checked by hand and reused on rows that came from elsewhere.
"""

from __future__ import annotations

import dataclasses
import re

# How the attention score/value matmuls are counted in model FLOPs.
ATTENTION_FULL = "full"  # PaLM appendix B: QK^T and AV over the whole s x s square
ATTENTION_CAUSAL = "causal_half"  # MaxText: a causal mask skips half the square


def param_count(d_model: int, n_layers: int, vocab: int, d_ff: int | None = None) -> int:
    """Parameters of jaxscale's transformer.

    Per layer: q, k, v, o projections (4·d²), the MLP in and out (2·d·d_ff) and two
    RMSNorm scales (2·d). Outside the layers: the token embedding (V·d), the final
    norm (d) and the untied LM head (d·V). Positions use RoPE, which has none.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    per_layer = 4 * d_model * d_model + 2 * d_model * d_ff + 2 * d_model
    return n_layers * per_layer + 2 * vocab * d_model + d_model


def train_flops(
    d_model: int,
    n_layers: int,
    seq_len: int,
    vocab: int,
    batch: int,
    d_ff: int | None = None,
    recompute: bool = False,
    causal: bool = False,
) -> int:
    """Training FLOPs of one step (forward + backward) of a decoder-only transformer.

    ``batch·seq_len·[(3 + recompute)·n_layers·(8·d² + 4·d·d_ff + 4·seq_len·d) + 6·d·vocab]``

    Each matmul weight costs 2 FLOPs per token forward and 4 backward, hence
    6 × matmul params × tokens; attention adds QKᵀ and AV, 2·s·d each forward.
    Without recompute this is the PaLM definition of model FLOPs. With recompute
    (the forward pass of every layer is run again in the backward pass) and
    d_ff = 4d it equals Megatron-LM's 96·B·s·l·h²·(1 + s/6h + V/16lh).
    ``causal=True`` halves the attention term, since a causal mask leaves half of
    the s×s scores unused (MaxText's convention); the LM head is never recomputed.

    Args:
      d_model, n_layers, seq_len, vocab: model dimensions.
      batch: sequences per step (global batch).
      d_ff: MLP width (default 4·d_model).
      recompute: count the extra forward pass of full activation recomputation.
      causal: halve the attention-score FLOPs.

    Returns:
      FLOPs per training step, an int.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    attention = 4 * seq_len * d_model
    if causal:
        attention //= 2
    per_layer = 8 * d_model * d_model + 4 * d_model * d_ff + attention
    passes = 3 + int(recompute)
    return batch * seq_len * (passes * n_layers * per_layer + 6 * d_model * vocab)


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak_tflops_per_device: float) -> float:
    """Fraction of the devices' peak FLOP/s achieved: flops / (t · n · peak)."""
    return flops_per_step / (step_time_s * n_devices * peak_tflops_per_device * 1e12)


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Spec figures for one device kind (one JAX device, i.e. one chip or one GPU).

    Attributes:
      name: the marketing name of the part.
      bf16_tflops: dense (no sparsity) bf16 matmul peak, TFLOP/s per device.
      hbm_gbytes_per_s: memory bandwidth, GB/s (1e9 bytes) per device.
      memory_gib: device memory, GiB.
      interconnect_gbytes_per_s: per-device unidirectional bandwidth of the
        fast interconnect (ICI or NVLink), GB/s, used for predicted comm time.
      interconnect: which figure that is.
      source: where the numbers come from.
    """

    name: str
    bf16_tflops: float
    hbm_gbytes_per_s: float
    memory_gib: float
    interconnect_gbytes_per_s: float
    interconnect: str
    source: str


# Matched against jax's Device.device_kind with the regexes in _KIND_PATTERNS.
PEAKS: dict[str, DevicePeak] = {
    # Google Cloud TPU v4 page: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s, ICI 3D torus.
    "tpu-v4": DevicePeak("TPU v4", 275.0, 1200.0, 32, 270.0, "ICI (6 links x 45 GB/s)",
                         "cloud.google.com/tpu/docs/v4"),
    # Cloud TPU v5e page: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 1,600 Gbps.
    "tpu-v5e": DevicePeak("TPU v5e", 197.0, 819.0, 16, 200.0, "ICI 1,600 Gbps",
                          "cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU v5p page: 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s, ICI 4,800 Gbps.
    "tpu-v5p": DevicePeak("TPU v5p", 459.0, 2765.0, 95, 600.0, "ICI 4,800 Gbps",
                          "cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU v6e (Trillium) page: 918 TFLOP/s bf16, 32 GiB HBM at 1,640 GB/s, ICI 3,584 Gbps.
    "tpu-v6e": DevicePeak("TPU v6e", 918.0, 1640.0, 32, 448.0, "ICI 3,584 Gbps",
                          "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s bidirectional.
    "a100-80gb": DevicePeak("NVIDIA A100 80GB SXM", 312.0, 2039.0, 80, 300.0, "NVLink3 (600 GB/s bidirectional)",
                            "NVIDIA A100 Tensor Core GPU datasheet"),
    # NVIDIA A100 datasheet: 40 GB HBM2 at 1,555 GB/s.
    "a100-40gb": DevicePeak("NVIDIA A100 40GB SXM", 312.0, 1555.0, 40, 300.0, "NVLink3 (600 GB/s bidirectional)",
                            "NVIDIA A100 Tensor Core GPU datasheet"),
    # NVIDIA H100 datasheet, SXM: 989.4 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s,
    # NVLink4 900 GB/s bidirectional.
    "h100-sxm": DevicePeak("NVIDIA H100 SXM", 989.4, 3350.0, 80, 450.0, "NVLink4 (900 GB/s bidirectional)",
                           "NVIDIA H100 Tensor Core GPU datasheet (SXM)"),
    # NVIDIA H100 datasheet, PCIe: 756 TFLOP/s bf16 dense, 80 GB HBM2e at 2 TB/s, PCIe Gen5 128 GB/s.
    "h100-pcie": DevicePeak("NVIDIA H100 PCIe", 756.0, 2000.0, 80, 64.0, "PCIe Gen5 x16 (128 GB/s bidirectional)",
                            "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    # NVIDIA H200 datasheet, SXM: 989 TFLOP/s bf16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": DevicePeak("NVIDIA H200 SXM", 989.4, 4800.0, 141, 450.0, "NVLink4 (900 GB/s bidirectional)",
                       "NVIDIA H200 Tensor Core GPU datasheet"),
    # NVIDIA DGX B200 datasheet: 72 PFLOP/s FP8 training for 8 GPUs -> 2.25 PFLOP/s dense bf16 each,
    # 1,440 GB HBM3e for 8 (180 GB each) at 8 TB/s, NVLink5 1.8 TB/s bidirectional.
    "b200": DevicePeak("NVIDIA B200", 2250.0, 8000.0, 180, 900.0, "NVLink5 (1.8 TB/s bidirectional)",
                       "NVIDIA DGX B200 datasheet"),
}

# jax device_kind strings as the runtimes report them, e.g. "TPU v4", "TPU v5 lite",
# "TPU v5p" / "TPU v5", "TPU v6 lite", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA B200". Order matters: first match wins.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^tpu v4", "tpu-v4"),
    (r"^tpu v5 ?lite|^tpu v5e", "tpu-v5e"),
    (r"^tpu v5p?$|^tpu v5p", "tpu-v5p"),
    (r"^tpu v6 ?lite|^tpu v6e", "tpu-v6e"),
    (r"a100.*40gb", "a100-40gb"),
    (r"a100", "a100-80gb"),
    (r"h100.*pcie", "h100-pcie"),
    (r"h100", "h100-sxm"),
    (r"h200", "h200"),
    (r"b200", "b200"),
)


def lookup_peak(device_kind: str) -> tuple[str, DevicePeak] | None:
    """The table entry for a jax ``device_kind``, or None when the kind is unknown.

    Unknown kinds are never matched to a neighbour: the caller must measure them
    (``jaxscale calibrate``) rather than borrow another chip's figure.
    """
    kind = device_kind.strip().lower()
    for pattern, key in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return key, PEAKS[key]
    return None


def bytes_per_element(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
