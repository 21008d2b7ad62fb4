"""Running the CLI as a user would, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

TINY_SETS = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.seq_len=8", "model.vocab=64",
             "run.steps=3", "run.warmup=1"]


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def jaxscale(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *map(str, args)], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def sets(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out
