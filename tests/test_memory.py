"""Device memory: the GPU allocator's set-up and the budget a point may plan to use."""

import dataclasses

import pytest

from jaxscale import devices as devinfo
from jaxscale.memory import allocator_for, memory_budget


def test_the_gpu_allocator_takes_max_memory_fraction_unless_the_user_set_it_up():
    ours = allocator_for(0.9, environ={})
    assert ours.env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"} and (ours.memory_fraction, ours.set_by) == (0.9, "jaxscale")
    for env, fraction in (({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}, 0.5), ({"XLA_CLIENT_MEM_FRACTION": "0.6"}, 0.6),
                          ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, 0.75),  # JAX's default share
                          ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}, None)):  # on demand: no fixed limit
        theirs = allocator_for(0.9, environ=env)
        assert theirs.env == {} and theirs.set_by == "user" and theirs.memory_fraction == fraction
        assert theirs.settings == env


def test_the_budget_is_a_fraction_of_the_devices_memory():
    """On the H200 (profiles/results/nvidia-h200-accelerator-check/device.json) the allocator at a 0.95
    share reported bytes_limit 142,606,336,000: the device's memory is then 150.11 GB, within 0.5% of
    the 143,771 MiB nvidia-smi reported for the card (what CUDA keeps for itself is the rest)."""
    peak = devinfo.spec_peak("NVIDIA H200", "gpu", "bfloat16", memory_bytes=142_606_336_000)
    gpu = memory_budget(peak, 0.9, allocator_fraction=0.95, platform="gpu")
    assert gpu.device_memory_bytes == pytest.approx(143_771 * 2 ** 20, rel=0.005)
    assert gpu.budget_bytes == int(0.9 * gpu.device_memory_bytes) and gpu.bytes_limit == 142_606_336_000
    capped = memory_budget(peak, 0.99, allocator_fraction=0.95, platform="gpu")
    assert capped.budget_bytes == 142_606_336_000  # never more than the allocator can give
    tpu = memory_budget(dataclasses.replace(peak, memory_bytes=16 * 2 ** 30), 0.95, platform="tpu")
    assert (tpu.device_memory_bytes, tpu.budget_bytes) == (16 * 2 ** 30, int(0.95 * 16 * 2 ** 30))
