"""What runtime.json records about the toolchain: the user's XLA flags, CUDA and cuDNN versions."""

import importlib.metadata
import types

import pytest

from jaxscale import sweep
from jaxscale.config import ADDED_XLA_FLAGS_ENV


def test_the_users_xla_flags_are_told_from_jaxscales():
    flag = "--xla_force_host_platform_device_count=8"
    assert sweep.split_xla_flags(flag, flag) == ("", flag)
    assert sweep.split_xla_flags(f"--xla_a=1 {flag}", flag) == ("--xla_a=1", flag)
    assert sweep.split_xla_flags("--xla_gpu_autotune_level=0", "") == ("--xla_gpu_autotune_level=0", "")


def test_toolchain_records_what_the_user_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_force_host_platform_device_count=8")
    monkeypatch.setenv(ADDED_XLA_FLAGS_ENV, "--xla_force_host_platform_device_count=8")
    out = sweep.toolchain_versions("cpu")
    assert out["xla_flags"] == "--xla_gpu_autotune_level=0"
    assert out["xla_flags_added"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.delenv(ADDED_XLA_FLAGS_ENV)  # flags the user set that happen to match jaxscale's stay the user's
    assert sweep.toolchain_versions("cpu")["xla_flags_added"] == ""


def test_version_integers_as_text():
    assert sweep.cuda_version_text(12090) == "12.9"  # cudaRuntimeGetVersion: 1000 major + 10 minor
    assert sweep.cuda_version_text(13000) == "13.0"
    assert sweep.cudnn_version_text(90800) == "9.8.0"  # cuDNN 9: 10000 major + 100 minor + patch
    assert sweep.cudnn_version_text(91002) == "9.10.2"
    assert sweep.cudnn_version_text(8907) == "8.9.7"  # cuDNN 8: 1000 major + 100 minor + patch


def _plugin(**functions):
    return types.SimpleNamespace(**{name: (lambda v=v: v() if callable(v) else v) for name, v in functions.items()})


def test_cuda_versions_come_from_jax_then_from_the_wheels(monkeypatch):
    from jax._src import lib as jax_lib

    def no_cudnn():
        raise RuntimeError("cuDNN not found.")

    monkeypatch.setattr(jax_lib, "cuda_versions", _plugin(cuda_runtime_get_version=12090, cudnn_get_version=no_cudnn,
                                                           cuda_driver_get_version=13000), raising=False)
    installed = {"nvidia-cudnn-cu13": "9.13.0.50", "nvidia-cuda-runtime": "13.0.96"}

    def version(name):
        if name in installed:
            return installed[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert sweep.cuda_versions() == {"cuda_version": "12.9", "cudnn_version": "9.13.0.50",
                                     "cuda_driver_version": "13.0"}
    # Off a GPU the plugin is not asked; the wheels still answer (CUDA 13's runtime wheel has no suffix).
    assert sweep.cuda_versions(ask_plugin=False) == {"cuda_version": "13.0.96", "cudnn_version": "9.13.0.50",
                                                     "cuda_driver_version": None}
    monkeypatch.setattr(jax_lib, "cuda_versions", None, raising=False)
    installed.clear()
    assert sweep.cuda_versions() == {"cuda_version": None, "cudnn_version": None, "cuda_driver_version": None}


@pytest.mark.skipif(not sweep.cuda_versions()["cuda_version"], reason="needs JAX's CUDA plugin and a GPU")
def test_cuda_versions_on_a_gpu_are_known():
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("no GPU backend")
    versions = sweep.toolchain_versions("gpu")
    assert versions["cuda_version"] and versions["cudnn_version"] and versions["cuda_driver_version"]
