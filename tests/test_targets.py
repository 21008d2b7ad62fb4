"""Targets: the TPU slices and GPU hosts a user would rent, and libtpu kept quiet where no TPU is attached."""

import subprocess
import sys

import pytest

from helpers import cli_env
from jaxscale import targets


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
    code = "from jaxscale.cli import _prepare_runtime; _prepare_runtime(False); import jax; print(jax.devices()[0].platform)"
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
