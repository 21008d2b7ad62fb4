"""Targets: the TPU slices and GPU hosts a user would rent, libtpu kept quiet where no TPU is attached, and the
toolchain runtime.json records (the user's XLA flags, CUDA and cuDNN versions)."""

import importlib.metadata
import subprocess
import sys
import types

import pytest

from helpers import cli_env
from jaxscale import targets
from jaxscale.config import ADDED_XLA_FLAGS_ENV


def test_slices_are_the_ones_a_user_would_rent():
    v5e = targets.parse_target("v5e:16x16")
    assert [v5e.slice_for(n) for n in (1, 2, 4, 8, 16, 64, 256)] == [
        "v5e:2x2", "v5e:2x2", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:8x8", "v5e:16x16"]
    assert targets.parse_target("v5p:4x4x4").slice_for(8) == "v5p:2x2x2"
    two = v5e.devices_for(2)  # below the smallest slice: chips of one host
    assert len(two) == 2 and len({d.process_index for d in two}) == 1
    hosts = {d.process_index for d in targets.slice_devices("v5e:16x16")}
    assert len(targets.slice_devices("v5e:16x16")) == 256 and len(hosts) == 64
    for bad in ("v5e:3x3", "v9:2x2", "h100"):
        with pytest.raises(targets.TargetError):
            targets.parse_target(bad)


def test_libtpu_stays_quiet_where_no_tpu_is_attached(tmp_path):
    env = {k: v for k, v in cli_env().items() if k not in ("JAX_PLATFORMS",) and not k.startswith("TPU_")}
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    code = "from jaxscale.startup import prepare_process; prepare_process(False); import jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr


def test_gpu_clusters_rent_whole_hosts():
    h100 = targets.parse_target("h100:4x8")
    assert (h100.platform, h100.n_chips) == ("gpu", 32)
    assert [h100.slice_for(n) for n in (1, 4, 8, 16, 32)] == ["h100:1x1", "h100:1x4", "h100:1x8", "h100:2x8",
                                                             "h100:4x8"]
    with pytest.raises(targets.TargetError):
        h100.slice_for(12)  # a host and a half
    with pytest.raises(targets.TargetError):
        targets.parse_target("h100:2x16")


def test_the_users_xla_flags_are_told_from_jaxscales():
    flag = "--xla_force_host_platform_device_count=8"
    assert targets.split_xla_flags(flag, flag) == ("", flag)
    assert targets.split_xla_flags(f"--xla_a=1 {flag}", flag) == ("--xla_a=1", flag)
    assert targets.split_xla_flags("--xla_gpu_autotune_level=0", "") == ("--xla_gpu_autotune_level=0", "")


def test_toolchain_records_what_the_user_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_force_host_platform_device_count=8")
    monkeypatch.setenv(ADDED_XLA_FLAGS_ENV, "--xla_force_host_platform_device_count=8")
    out = targets.toolchain_versions("cpu")
    assert out["xla_flags"] == "--xla_gpu_autotune_level=0"
    assert out["xla_flags_added"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.delenv(ADDED_XLA_FLAGS_ENV)  # flags the user set that happen to match jaxscale's stay the user's
    assert targets.toolchain_versions("cpu")["xla_flags_added"] == ""


def test_version_integers_as_text():
    assert targets.cuda_version_text(12090) == "12.9"  # cudaRuntimeGetVersion: 1000 major + 10 minor
    assert targets.cuda_version_text(13000) == "13.0"
    assert targets.cudnn_version_text(90800) == "9.8.0"  # cuDNN 9: 10000 major + 100 minor + patch
    assert targets.cudnn_version_text(91002) == "9.10.2"
    assert targets.cudnn_version_text(8907) == "8.9.7"  # cuDNN 8: 1000 major + 100 minor + patch


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
    assert targets.cuda_versions() == {"cuda_version": "12.9", "cudnn_version": "9.13.0.50",
                                     "cuda_driver_version": "13.0"}
    # Off a GPU the plugin is not asked; the wheels still answer (CUDA 13's runtime wheel has no suffix).
    assert targets.cuda_versions(ask_plugin=False) == {"cuda_version": "13.0.96", "cudnn_version": "9.13.0.50",
                                                     "cuda_driver_version": None}
    monkeypatch.setattr(jax_lib, "cuda_versions", None, raising=False)
    installed.clear()
    assert targets.cuda_versions() == {"cuda_version": None, "cudnn_version": None, "cuda_driver_version": None}


@pytest.mark.skipif(not targets.cuda_versions()["cuda_version"], reason="needs JAX's CUDA plugin and a GPU")
def test_cuda_versions_on_a_gpu_are_known():
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("no GPU backend")
    versions = targets.toolchain_versions("gpu")
    assert versions["cuda_version"] and versions["cudnn_version"] and versions["cuda_driver_version"]
