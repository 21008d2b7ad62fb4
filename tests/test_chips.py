"""chips.py against datasheet figures typed in here, and the math mode a run's matmuls execute in."""

import pytest

from jaxscale import chips, devices


# Every device_kind string the table knows, as the runtimes report it, with the
# part it must map to (None: recognised, but no confirmed figures, so calibrated)
# and the dense bf16 peak read off that part's datasheet (TFLOP/s; NVIDIA quotes
# tensor figures with 2:4 sparsity, so its BF16 number is halved here).
DEVICE_STRINGS = [
    ("TPU v4", "tpu-v4", 275.0),
    ("TPU v4 lite", None, None),
    ("TPU v5 lite", "tpu-v5e", 197.0),
    ("TPU v5e", "tpu-v5e", 197.0),
    ("TPU v5", "tpu-v5p", 459.0),  # libtpu's name for v5p (checked in test_devices on a v5p topology)
    ("TPU v5p", "tpu-v5p", 459.0),
    ("TPU v6 lite", "tpu-v6e", 918.0),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm4-40gb", 312.0),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb", 312.0),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb", 312.0),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb", 312.0),
    ("NVIDIA H100 80GB HBM3", "h100-sxm", 1979 / 2),
    ("NVIDIA H100 PCIe", "h100-pcie", 1513 / 2),
    ("NVIDIA H100 NVL", None, None),
    ("NVIDIA H200", "h200", 1979 / 2),
    ("NVIDIA GH200 480GB", None, None),
    ("NVIDIA B200", "b200", 36000 / 8 / 2),
    ("NVIDIA GB200", None, None),
    ("NVIDIA L4", "l4", 242 / 2),
]


@pytest.mark.parametrize("kind, key, bf16", DEVICE_STRINGS)
def test_every_reported_device_kind_maps_to_its_part_or_to_unknown(kind, key, bf16):
    chip = chips.chip_for_kind(kind)
    assert (chip.key if chip else None) == key
    peak = chips.device_peak(kind, "bfloat16")
    if key is None:
        assert peak is None
    else:
        assert peak.tflops == pytest.approx(bf16) and peak.dtype == "bf16" and all(peak.sources)
    assert chips.chip_for_kind(f"  {kind.upper()} ") == chip  # case and padding do not matter


def test_the_table_has_no_kind_the_test_does_not_check():
    assert {k.lower() for k, _, _ in DEVICE_STRINGS} == set(chips.DEVICE_KINDS)


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA GeForce RTX 4090", "TPU v7x", "Radeon MI300X", "NVIDIA H100",
                                  "NVIDIA H100 80GB HBM3 (MIG 1g.10gb)", "TPU v6", "NVIDIA A100", "H200"])
def test_near_misses_are_unknown_not_a_neighbour(kind):
    assert chips.chip_for_kind(kind) is None and chips.device_peak(kind, "bf16") is None


def test_neighbours_that_substring_matching_confused_stay_apart():
    # "h200" is inside "gh200", "b200" inside "gb200", "h100" inside "h100 nvl", "tpu v4" inside "tpu v4 lite"
    for kind in ("NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA H100 NVL", "TPU v4 lite"):
        assert chips.device_peak(kind, "bf16") is None
    pcie, sxm = chips.chip_for_kind("NVIDIA A100-PCIE-40GB"), chips.chip_for_kind("NVIDIA A100-SXM4-40GB")
    assert pcie.local_link.name.startswith("PCIe") and sxm.local_link.name == "NVLink3"
    assert chips.chip_for_kind("NVIDIA A100 80GB PCIe").hbm_gbytes_per_s == 1935.0  # not the SXM's 2,039


@pytest.mark.parametrize("key", [k for k in chips.CHIPS if chips.CHIPS[k].platform == "gpu"])
def test_nvidia_tensor_core_ratios(key):
    """Architectural ratios of dense tensor-core throughput: TF32 is half of BF16 (Ampere on); FP16 equals
    BF16; FP8 is twice BF16 (Hopper, Ada, Blackwell); plain FP32 runs on the CUDA cores, below TF32."""
    t = chips.CHIPS[key].tflops
    assert t["tf32"] == pytest.approx(t["bf16"] / 2, rel=0.01)
    assert t["fp16"] == t["bf16"]
    if "fp8" in t:
        assert t["fp8"] == pytest.approx(2 * t["bf16"], rel=0.01)
    if "fp32" in t:
        assert t["fp32"] < t["tf32"]


def test_peaks_per_dtype_and_unknown_dtypes():
    assert chips.device_peak("NVIDIA H100 80GB HBM3", "tf32").tflops == pytest.approx(989 / 2)
    assert chips.device_peak("NVIDIA H100 80GB HBM3", "float32").tflops == 67.0
    assert chips.device_peak("NVIDIA H100 80GB HBM3", "fp8").tflops == pytest.approx(3958 / 2)
    assert chips.device_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # Ampere has no FP8 tensor cores
    assert chips.device_peak("TPU v5 lite", "float32") is None  # no datasheet figure for multi-pass float32
    assert chips.device_peak("TPU v5", "fp8").tflops == 459.0
    assert chips.device_peak("NVIDIA H100 80GB HBM3", "int4") is None


@pytest.mark.parametrize("platform, dtype, precision, mode", [
    ("gpu", "bfloat16", None, "bf16"),
    ("gpu", "float32", None, "tf32"),  # JAX's default matmul precision: TF32 tensor cores from Ampere on
    ("cuda", "float32", "high", "tf32"),
    ("gpu", "float32", "highest", "fp32"),
    ("tpu", "bfloat16", None, "bf16"),
    ("tpu", "float32", None, "bf16"),  # default precision: one bf16 MXU pass
    ("tpu", "float32", "highest", None),
    ("tpu", "float32", "high", None),
    ("gpu", "float32", "BF16_BF16_F32", "bf16"),  # dot algorithm presets name the mode
    ("gpu", "float32", "TF32_TF32_F32_X3", None),
    ("tpu", "float32", "F32_F32_F32", None),
])
def test_the_math_mode_matmuls_run_in(platform, dtype, precision, mode):
    got, why = chips.matmul_math_mode(platform, dtype, precision)
    assert got == mode and why


def test_a_float32_run_gets_its_own_peak_or_none_never_the_bf16_one():
    h100 = devices.spec_peak("NVIDIA H100 80GB HBM3", "gpu", "float32")
    assert h100.tflops == pytest.approx(989 / 2) and h100.dtype == "tf32" and "TF32" in h100.precision
    strict = devices.spec_peak("NVIDIA H100 80GB HBM3", "gpu", "float32", precision="highest")
    assert strict.tflops == 67.0 and strict.dtype == "fp32"
    tpu = devices.spec_peak("TPU v5 lite", "tpu", "float32", precision="highest")
    assert tpu.tflops is None and "MFU" in tpu.note and tpu.hbm_gbytes_per_s == 819.0
    assert devices.spec_peak("NVIDIA GH200 480GB", "gpu", "bfloat16") is None  # calibrated instead
