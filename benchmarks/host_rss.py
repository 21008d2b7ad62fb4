"""Peak host memory of a sweep over a model whose float32 training state is several GB.

A training state of P parameters is 12·P bytes in float32: the parameters and
AdamW's two moments. jaxscale creates it sharded on the devices by a jitted
initializer, so a process should hold about one copy of it (plus the
gradients, 4·P bytes, and the step's temporaries: what XLA's memory analysis
of the step counts), not a host copy beside the device copy. On the CPU the "devices" are host memory, so the process's peak
resident set shows every copy.

Prints, for one point (dp, 1 device) of one size, run by `jaxscale run` with
isolation ``none`` (one process) and ``process`` (a worker per point): the
peak RSS of the largest process, the state's size, their ratio, and the same
after subtracting an idle JAX process's RSS.

Usage: python benchmarks/host_rss.py [--d-model 2048] [--n-layers 4] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_of(cmd: list[str], env: dict) -> tuple[int, float, subprocess.CompletedProcess]:
    """(peak RSS in bytes of the largest process in cmd's tree, wall s, result); run in a fresh child."""
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, "
             "r.stdout[-2000:], r.stderr[-4000:]]))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    import json

    kib, code, stdout, stderr = json.loads(out.stdout.strip().splitlines()[-1])
    return kib * 1024, wall, subprocess.CompletedProcess(cmd, code, stdout, stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=16)
    args = parser.parse_args()
    from jaxscale.flops import param_count

    d, layers, vocab = args.d_model, args.n_layers, args.vocab
    params = param_count(d, layers, vocab, 4 * d)
    state = 12 * params
    # one CPU device: the memory budget of a point is then the whole host's, not an eighth of it
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    idle, _, _ = peak_rss_of([sys.executable, "-c", "import jax, flax.nnx, optax, pandas; jax.devices()"], env)
    print(f"model: d_model {d}, {layers} layers, vocab {vocab}: {params / 1e6:.0f}M parameters, float32 state "
          f"(params + AdamW moments) {state / 2**30:.2f} GiB; an idle JAX process: {idle / 2**30:.2f} GiB")
    with tempfile.TemporaryDirectory(prefix="jaxscale-rss-") as work:
        for isolation in ("none", "process"):
            sets = [f"model.d_model={d}", f"model.n_layers={layers}", f"model.vocab={vocab}", "model.n_heads=16",
                    f"model.seq_len={args.seq_len}", "batch.global_batch=1", "mesh.devices=[1]",
                    "mesh.strategies=dp", "run.steps=2", "run.warmup=0", f"run.isolation={isolation}"]
            cmd = [sys.executable, "-m", "jaxscale.cli", "run", "smoke", "--out", str(Path(work) / isolation),
                   "--no-analyze"]
            for item in sets:
                cmd += ["--set", item]
            rss, wall, result = peak_rss_of(cmd, env)
            if result.returncode != 0:
                print(f"isolation {isolation}: the run failed (exit {result.returncode}):\n{result.stdout}\n"
                      f"{result.stderr}")
                continue
            (csv,) = (Path(work) / isolation).glob("*/runs.csv")
            with open(csv, newline="") as f:
                (row,) = list(__import__("csv").DictReader(f))
            step = int(row["compiled_total_bytes"])
            print(f"isolation {isolation:>7}: peak RSS {rss / 2**30:.2f} GiB = {rss / state:.2f} x the state "
                  f"({(rss - idle) / state:.2f} x above an idle JAX process); the compiled step alone needs "
                  f"{step / 2**30:.2f} GiB (state, gradients, temporaries); RSS above idle and the step: "
                  f"{(rss - idle - step) / 2**30:.2f} GiB; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
