"""Start-up: where a point runs (in this process or a worker process), decided before JAX starts."""

import pytest

from jaxscale import startup
from jaxscale.config import ProfileError, load_profile


def test_isolation_choice():
    run = load_profile("smoke", ["run.isolation=process"]).run
    assert startup.choose_isolation(run) == "process"
    run = load_profile("smoke", ["run.isolation=none"]).run
    assert startup.choose_isolation(run) == "none"
    # the tests run on the CPU (JAX_PLATFORMS=cpu): auto keeps points in-process
    assert startup.choose_isolation(load_profile("smoke").run) == "none"
    flagged = load_profile("smoke", ['run.xla_flags=["", "--xla_cpu_enable_fast_math=false"]']).run
    assert startup.choose_isolation(flagged) == "process"  # XLA reads its flags once per process
    with pytest.raises(ProfileError, match="isolation = 'none' with \\[run\\] xla_flags"):
        startup.choose_isolation(load_profile("smoke", ['run.xla_flags=["--xla_cpu_enable_fast_math=false"]',
                                                        "run.isolation=none"]).run)


def test_a_cuda_plugin_without_a_driver_leaves_jax_on_the_cpu_before_jax_loads(tmp_path):
    """JAX reads JAX_PLATFORMS when it is imported: prepare_process must set it before anything imports JAX."""
    import subprocess
    import sys

    from helpers import cli_env

    env = {k: v for k, v in cli_env().items() if k != "JAX_PLATFORMS"}
    code = ("import jaxscale.targets as t; t.cuda_plugin_version = lambda: '0.0 (planted)'\n"
            "from jaxscale.startup import prepare_process; prepare_process(False)\n"
            "import jax; print(jax.config.jax_platforms)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"  # this machine has no NVIDIA driver and no TPU device files
