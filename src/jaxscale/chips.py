"""Datasheet facts of the parts jaxscale knows, each with its source: peaks per math mode, memory, links.

A jax ``device_kind`` maps to its part by exact name (``DEVICE_KINDS``), never by
substring; ``device_peak`` gives one part's facts for one math mode and
``matmul_math_mode`` says which mode a run's matmuls execute in. ``PRACTICAL``
holds what kernels reach of those figures where that was measured on the part.
Everything here is a table or a lookup: no JAX calls.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Link:
    """A device-to-device link, as one device sees it.

    Attributes:
      name: what the link is (``NVLink4``, ``ICI``, ``InfiniBand NDR``, ``DCN``).
      gbytes_per_s: bandwidth per device in one direction, GB/s (1e9 bytes), or
        None where no figure is published for the part.
      source: where the figure comes from.
    """

    name: str
    gbytes_per_s: float | None
    source: str


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet facts of one part (one JAX device: a GPU, or a TPU chip).

    Attributes:
      key: table key (``h100-sxm``).
      name: the part's marketing name.
      platform: ``gpu`` or ``tpu``.
      tflops: dense (no sparsity) matmul peak per math mode, TFLOP/s: ``bf16``,
        ``fp16``, ``tf32``, ``fp32``, ``fp8``. A mode the datasheet gives no
        figure for is absent.
      tflops_source: where the peaks come from, and how sparsity figures were halved.
      hbm_gbytes_per_s: memory bandwidth, GB/s.
      memory_gbytes: device memory, GB (1e9 bytes), or None.
      memory_source: where the memory figures come from.
      local_link: between devices of one host (GPU: NVLink or PCIe) or of one
        slice (TPU: ICI, which also joins the hosts of a slice). For a TPU, the
        figure is what one mesh axis gets: a ring along one torus dimension.
      remote_link: between hosts (GPU: the cluster network, given for the
        reference system named in its source) or between slices (TPU: DCN).
    """

    key: str
    name: str
    platform: str
    tflops: dict
    tflops_source: str
    hbm_gbytes_per_s: float
    memory_gbytes: float | None
    memory_source: str
    local_link: Link
    remote_link: Link


_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
_A100_SRC = ("NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5, TF32 156, BF16/FP16 312 TFLOP/s dense "
             "(the 312/624 figures with an asterisk are with sparsity); SXM and PCIe parts have the same peaks")
_H100_SXM = {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0}
_H100_SXM_SRC = ("NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67; TF32 989, BF16/FP16 1,979, "
                 "FP8 3,958 TFLOP/s with sparsity, halved for dense")
_NVLINK3 = Link("NVLink3", 300.0, "A100 datasheet: NVLink 600 GB/s (both directions)")
_NVLINK4 = Link("NVLink4", 450.0, "H100/H200 datasheets: NVLink 900 GB/s (both directions)")
_NVLINK5 = Link("NVLink5", 900.0, "DGX B200 datasheet: NVLink 1.8 TB/s per GPU (both directions)")
_PCIE4 = Link("PCIe Gen4 x16", 32.0, "datasheet: PCIe Gen4 64 GB/s (both directions)")
_PCIE5 = Link("PCIe Gen5 x16", 64.0, "H100 datasheet, PCIe: PCIe Gen5 128 GB/s (both directions)")
_IB_HDR_DGX = Link("InfiniBand HDR", 25.0, "DGX A100 reference system: 8x 200 Gb/s ConnectX-6 per 8 GPUs; "
                                             "a different cluster network needs its own figure")
_IB_NDR_DGX = Link("InfiniBand NDR", 50.0, "DGX H100/H200/B200 reference system: 8x 400 Gb/s ConnectX-7 per 8 GPUs; "
                                             "a different cluster network needs its own figure")
_NO_NETWORK = Link("host network", None, "no reference system: the cluster network is not a property of the card")


# What a mesh axis gets of a TPU's ICI: a ring along one torus dimension, whose every
# chip sends over its two ports on that dimension (one to each neighbour) at once.
_ICI_AXIS = ("a ring along one torus dimension uses 2 ports, one way each (an axis laid over several torus "
             "dimensions can use more)")


def _tpu_source(version: str) -> str:
    return f"Cloud TPU {version} system architecture page (cloud.google.com/tpu/docs/{version})"


CHIPS: dict[str, Chip] = {c.key: c for c in (
    Chip("tpu-v4", "TPU v4", "tpu", {"bf16": 275.0}, _tpu_source("v4") + ": 275 TFLOP/s bf16 per chip",
         1200.0, 32 * 2 ** 30 / 1e9, _tpu_source("v4") + ": 32 GiB HBM2 at 1,200 GB/s",
         Link("ICI", 90.0, "JAX scaling book (TPU chapter): ICI 4.5e10 B/s per link one way, 6 links (3D torus); "
                           + _ICI_AXIS),
         Link("DCN", None, "no per-chip DCN figure published for v4")),
    Chip("tpu-v5e", "TPU v5e", "tpu", {"bf16": 197.0}, _tpu_source("v5e") + ": 197 TFLOP/s bf16 per chip",
         819.0, 16 * 2 ** 30 / 1e9, _tpu_source("v5e") + ": 16 GiB HBM2 at 819 GB/s",
         Link("ICI", 100.0, _tpu_source("v5e") + ": ICI 1,600 Gbps per chip one way (400 GB/s both directions) "
                            "over 4 ports, 50 GB/s per port; " + _ICI_AXIS),
         Link("DCN", 3.125, _tpu_source("v5e") + ": data center network 6.4 Tbps per 256-chip pod (2 x 100 Gbps "
                            "NIC per 8-chip host), 25 Gbps per chip")),
    Chip("tpu-v5p", "TPU v5p", "tpu", {"bf16": 459.0, "fp8": 459.0},
         _tpu_source("v5p") + ": 459 TFLOP/s per chip for BF16 and for FP8",
         2765.0, 95 * 2 ** 30 / 1e9, _tpu_source("v5p") + ": 95 GiB HBM2e at 2,765 GB/s",
         Link("ICI", 200.0, _tpu_source("v5p") + ": ICI 1,200 GB/s per chip both directions over 6 ports "
                            "(3D torus), 100 GB/s per port one way; " + _ICI_AXIS),
         Link("DCN", 6.25, _tpu_source("v5p") + ": DCN 50 Gbps per chip")),
    Chip("tpu-v6e", "TPU v6e (Trillium)", "tpu", {"bf16": 918.0}, _tpu_source("v6e") + ": 918 TFLOP/s bf16 per chip",
         1640.0, 32 * 2 ** 30 / 1e9, _tpu_source("v6e") + ": 32 GiB HBM at 1,640 GB/s",
         Link("ICI", 200.0, _tpu_source("v6e") + ": ICI 800 GB/s per chip both directions over 4 ports, "
                            "100 GB/s per port one way; " + _ICI_AXIS),
         Link("DCN", 12.5, _tpu_source("v6e") + ": data center network 25.6 Tbps per 256-chip pod (4 x 200 Gbps "
                           "NIC per 8-chip host), 100 Gbps per chip")),
    Chip("a100-sxm4-40gb", "NVIDIA A100 40GB SXM", "gpu", _A100, _A100_SRC, 1555.0, 40.0,
         "A100 datasheet: 40 GB HBM2 at 1,555 GB/s", _NVLINK3, _IB_HDR_DGX),
    Chip("a100-sxm4-80gb", "NVIDIA A100 80GB SXM", "gpu", _A100, _A100_SRC, 2039.0, 80.0,
         "A100 datasheet: 80 GB HBM2e at 2,039 GB/s", _NVLINK3, _IB_HDR_DGX),
    Chip("a100-pcie-40gb", "NVIDIA A100 40GB PCIe", "gpu", _A100, _A100_SRC, 1555.0, 40.0,
         "A100 datasheet: 40 GB HBM2 at 1,555 GB/s", _PCIE4, _NO_NETWORK),
    Chip("a100-pcie-80gb", "NVIDIA A100 80GB PCIe", "gpu", _A100, _A100_SRC, 1935.0, 80.0,
         "A100 datasheet: 80 GB HBM2e at 1,935 GB/s", _PCIE4, _NO_NETWORK),
    Chip("h100-sxm", "NVIDIA H100 SXM", "gpu", _H100_SXM, _H100_SXM_SRC, 3350.0, 80.0,
         "H100 datasheet, SXM: 80 GB HBM3 at 3.35 TB/s", _NVLINK4, _IB_NDR_DGX),
    Chip("h100-pcie", "NVIDIA H100 PCIe", "gpu",
         {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0},
         "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: FP32 51; TF32 756, BF16/FP16 1,513, "
         "FP8 3,026 TFLOP/s with sparsity, halved for dense", 2000.0, 80.0,
         "H100 datasheet, PCIe: 80 GB HBM2e at 2 TB/s", _PCIE5, _NO_NETWORK),
    Chip("h200", "NVIDIA H200 SXM", "gpu", _H100_SXM,
         "NVIDIA H200 Tensor Core GPU datasheet, SXM: FP32 67; TF32 989, BF16/FP16 1,979, FP8 3,958 TFLOP/s "
         "with sparsity, halved for dense", 4800.0, 141.0, "H200 datasheet: 141 GB HBM3e at 4.8 TB/s",
         _NVLINK4, _IB_NDR_DGX),
    Chip("b200", "NVIDIA B200", "gpu", {"fp32": 75.0, "tf32": 1125.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
         "NVIDIA HGX B200 / DGX B200 datasheets, 8 GPUs: FP32 600 TFLOP/s; TF32 18, FP16/BF16 36, FP8 72 PFLOP/s "
         "with sparsity; per GPU, halved for dense", 8000.0, 180.0,
         "DGX B200 datasheet: 1,440 GB HBM3e at 64 TB/s for 8 GPUs", _NVLINK5, _IB_NDR_DGX),
    Chip("l4", "NVIDIA L4", "gpu", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
         "NVIDIA L4 datasheet: FP32 30.3; TF32 120, BF16/FP16 242, FP8 485 TFLOP/s with sparsity, halved for dense",
         300.0, 24.0, "L4 datasheet: 24 GB GDDR6 at 300 GB/s", _PCIE4, _NO_NETWORK),
)}

# What kernels reach of the datasheet figures in practice, measured on the part: (fraction of the
# dense matmul peak, fraction of the HBM bandwidth, how it was measured). jaxscale's roofline uses
# them as its efficiencies (η_c, η_m) where present, the datasheet's (1, 1) elsewhere.
PRACTICAL: dict[str, tuple[float, float, str]] = {
    "h200": (0.776, 0.686, "measured on one H200 SXM with jax 0.11.2 (2026-11-28): 16 bf16 GEMMs of the gpu-1x "
                           "profile's shapes (16384 rows) reach 0.20 to 0.82 of the dense peak, median 0.776; a "
                           "streaming elementwise op over 1 GiB of bf16 moves 3.29 TB/s, 0.686 of 4.8 TB/s"),
}

# Device kinds exactly as jax's Device.device_kind reports them, lower-cased: each
# maps to its CHIPS entry, or to None for a part jaxscale recognises but has no
# confirmed datasheet figures for (it is calibrated, never given a neighbour's
# numbers). A kind that is not here is unknown and calibrated too.
DEVICE_KINDS: dict[str, str | None] = {
    "tpu v4": "tpu-v4",
    "tpu v4 lite": None,  # v4i, an inference part: no public peak
    "tpu v5 lite": "tpu-v5e",
    "tpu v5e": "tpu-v5e",
    "tpu v5": "tpu-v5p",  # what libtpu reports for v5p chips
    "tpu v5p": "tpu-v5p",
    "tpu v6 lite": "tpu-v6e",
    "nvidia a100-sxm4-40gb": "a100-sxm4-40gb",
    "nvidia a100-sxm4-80gb": "a100-sxm4-80gb",
    "nvidia a100-pcie-40gb": "a100-pcie-40gb",
    "nvidia a100 80gb pcie": "a100-pcie-80gb",
    "nvidia h100 80gb hbm3": "h100-sxm",
    "nvidia h100 pcie": "h100-pcie",
    "nvidia h100 nvl": None,  # 94 GB NVL card: figures differ from SXM and PCIe, not confirmed here
    "nvidia h200": "h200",
    "nvidia gh200 480gb": None,  # Grace Hopper: its own clocks and 96 GB HBM3, not confirmed here
    "nvidia b200": "b200",
    "nvidia gb200": None,  # Grace Blackwell: per-GPU figures differ from B200, sources disagree
    "nvidia l4": "l4",
}

# Math modes of the peak table and the spellings that name them.
_MATH_MODES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "f16": "fp16",
               "tf32": "tf32", "tensorfloat32": "tf32", "fp32": "fp32", "float32": "fp32", "f32": "fp32",
               "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """What ``device_peak`` returns: one part's facts for one math mode.

    Attributes:
      key, name: the part (``CHIPS`` key and marketing name).
      dtype: the math mode the peak is for (``bf16``, ``tf32``, ``fp32``...).
      tflops: dense matmul peak in that mode, TFLOP/s per device.
      hbm_gbytes_per_s: memory bandwidth, GB/s.
      memory_gbytes: device memory, GB, or None.
      local_link, remote_link: see ``Chip``.
      sources: where each figure comes from (peak, memory, links).
    """

    key: str
    name: str
    dtype: str
    tflops: float
    hbm_gbytes_per_s: float
    memory_gbytes: float | None
    local_link: Link
    remote_link: Link
    sources: tuple[str, ...]


def chip_for_kind(device_kind: str) -> Chip | None:
    """The CHIPS entry of a jax ``device_kind`` (exact match, case-insensitive), or None."""
    key = DEVICE_KINDS.get(device_kind.strip().lower())
    return CHIPS[key] if key else None


def device_peak(device_kind: str, dtype: str) -> DevicePeak | None:
    """The datasheet peak of a device kind for one math mode, or None.

    Args:
      device_kind: ``jax.Device.device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``
        or ``"TPU v5 lite"``; matched exactly, never by substring.
      dtype: the math mode: ``bfloat16``/``bf16``, ``float32``/``fp32``,
        ``tf32``, ``float16``/``fp16``, ``fp8``.

    Returns:
      A DevicePeak, or None when the kind is unknown (or known without confirmed
      figures) or the datasheet gives no peak for that math mode.
    """
    chip = chip_for_kind(device_kind)
    mode = _MATH_MODES.get(dtype.strip().lower())
    if chip is None or mode is None or mode not in chip.tflops:
        return None
    return DevicePeak(key=chip.key, name=chip.name, dtype=mode, tflops=chip.tflops[mode],
                      hbm_gbytes_per_s=chip.hbm_gbytes_per_s, memory_gbytes=chip.memory_gbytes,
                      local_link=chip.local_link, remote_link=chip.remote_link,
                      sources=(chip.tflops_source, chip.memory_source, chip.local_link.source,
                               chip.remote_link.source))


# jax_default_matmul_precision values for float32 operands, grouped by what they
# ask for. None (the default) is Precision.DEFAULT.
_FASTEST = {None, "default", "fastest", "bfloat16"}
_MIDDLE = {"high", "tensorfloat32", "bfloat16_3x"}
_HIGHEST = {"highest", "float32"}
# Dot algorithm presets (lower-cased): (mode on a GPU, mode on a TPU); None where
# the algorithm takes several passes, for which no datasheet peak exists.
_PRESETS = {"bf16_bf16_f32": ("bf16", "bf16"), "bf16_bf16_bf16": ("bf16", "bf16"),
            "tf32_tf32_f32": ("tf32", None), "f32_f32_f32": ("fp32", None),
            "bf16_bf16_f32_x3": (None, None), "bf16_bf16_f32_x6": (None, None), "bf16_bf16_f32_x9": (None, None),
            "tf32_tf32_f32_x3": (None, None)}


def matmul_math_mode(platform: str, dtype: str, precision: str | None = None) -> tuple[str | None, str]:
    """The math mode the matmuls of a run execute in, and why.

    bfloat16 operands run in bf16 everywhere. float32 operands depend on the
    matmul precision (``jax_default_matmul_precision``, default None, i.e.
    Precision.DEFAULT): on NVIDIA GPUs from Ampere on, DEFAULT and HIGH use TF32
    tensor cores and HIGHEST true FP32; on TPUs DEFAULT is one bf16 MXU pass
    (bf16 peak), while HIGH (3 passes) and HIGHEST (6 passes) have no datasheet
    peak.

    Args:
      platform: ``gpu`` (or ``cuda``/``rocm``), ``tpu`` or ``cpu``.
      dtype: the run's compute dtype, ``bfloat16`` or ``float32``.
      precision: the jax_default_matmul_precision setting (None = default).

    Returns:
      (mode, description): mode is a key of Chip.tflops, or None when no
      datasheet peak applies (the description says why).
    """
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    precision = precision.lower() if isinstance(precision, str) else precision
    if dtype in ("bfloat16", "bf16"):
        return "bf16", "bf16 operands"
    if dtype in ("float16", "fp16"):
        return "fp16", "fp16 operands"
    if dtype not in ("float32", "fp32"):
        return None, f"no peak for {dtype} operands"
    setting = "default" if precision is None else precision
    preset = _PRESETS.get(precision)  # a named dot algorithm says the mode itself
    if preset is not None:
        return preset[platform == "tpu"], f"float32 operands with dot algorithm {setting}"
    if platform == "gpu":
        if precision in _FASTEST or precision in _MIDDLE:
            return "tf32", f"float32 operands at matmul precision {setting}: TF32 tensor cores"
        if precision in _HIGHEST:
            return "fp32", f"float32 operands at matmul precision {setting}: full FP32"
    if platform == "tpu":
        if precision in _FASTEST:
            return "bf16", f"float32 operands at matmul precision {setting}: one bf16 MXU pass"
        if precision in _MIDDLE | _HIGHEST:
            passes = 3 if precision in _MIDDLE else 6
            return None, (f"float32 operands at matmul precision {setting}: {passes} bf16 MXU passes, "
                          "for which no datasheet peak exists")
    return None, f"no datasheet peak for float32 matmuls on {platform} at precision {setting}"
