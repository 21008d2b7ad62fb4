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
