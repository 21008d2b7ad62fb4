"""The README's commands and example stay true."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    install_and_run, install_and_test = blocks[0].strip(), blocks[1].strip()
    assert install_and_run.endswith("jaxscale run")
    test_command = install_and_test.split("&&")[-1].strip()
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_profiling_example_runs():
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "profile_step" in b]
    namespace = {}
    exec(compile(example.replace("print(", "_printed = ("), "README", "exec"), namespace)
    prof = namespace["prof"]
    assert prof.n_devices == 4 and prof.step_time_s > 0 and 0 < prof.mfu
    # the sum over the data-sharded rows needs one all-reduce of a scalar
    assert prof.all_reduce_count == 1
