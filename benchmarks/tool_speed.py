"""How fast is jaxscale itself, and can its step times be trusted?

Prints three figures (run from the repository root, no accelerator needed):

1. Overhead: wall time of `jaxscale run smoke` against the compile and step
   time it recorded (compile_s, warmup_s and every other executed step, the
   untimed reference and tail steps counted at the mean step time). Target: the tool's own share under 15%.
2. Cold and warm cache: the same command with an empty and then a filled JAX
   persistent compilation cache.
3. Agreement: step_time_s as jaxscale measures it against an independent
   timing of the same compiled step (N steps dispatched back to back, one block
   at the end, total / N). Target: within 5% on the CPU.

Usage: python benchmarks/tool_speed.py [--profile smoke] [--points 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(profile: str, out: Path, cache: Path) -> tuple[float, Path]:
    env = {**os.environ, "JAXSCALE_CACHE_DIR": str(cache)}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxscale.cli", "run", profile, "--out", str(out), "--no-analyze"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (csv,) = out.glob("*/runs.csv")
    return wall, csv


def recorded_work_s(csv: Path) -> tuple[float, float]:
    from jaxscale.config import load_profile
    from jaxscale.records import read_rows

    rows = read_rows(csv)
    run = load_profile(str(csv.parent / "profile.toml")).run
    steps_run = run.steps + 2  # reference, timed and tail steps; warm-up is timed as warmup_s
    compile_s = float(rows["compile_s"].sum())
    return compile_s, compile_s + float(rows["warmup_s"].sum() + (rows["step_time_mean_s"] * steps_run).sum())


def agreement(profile_name: str, n_points: int, rounds: int = 3, n: int = 20) -> list[tuple[str, float, float]]:
    """(point, jaxscale's median step time, independent step time) for a spread of grid points.

    Both time the same compiled executable, in alternating rounds so that slow
    drifts of a shared machine hit both alike; each figure is the median over rounds.
    """
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import statistics

    from jaxscale.targets import quiet_plugins

    quiet_plugins()  # as the CLI does: no start-up noise from compile-only plugins
    import jax

    from jaxscale.config import load_profile
    from jaxscale.timing import time_pipelined
    from jaxscale.step import compile_point
    from jaxscale.sweep import grid_for

    profile = load_profile(profile_name)
    points, _ = grid_for(profile)
    stride = max(1, len(points) // n_points)
    out = []
    for point in points[::stride][:n_points]:
        compiled = compile_point(point, profile.run)
        state = dict(zip(("params", "opt"), compiled.init_state()))
        batches = [compiled.make_batch(i) for i in range(2)]

        def dispatch(i):
            state["params"], state["opt"], loss = compiled.compiled(state["params"], state["opt"], batches[i % 2])
            return loss

        ours, independent = [], []
        for _ in range(rounds):
            ours.append(time_pipelined(dispatch, n, 2).median_s)
            start = time.perf_counter()
            for i in range(n):
                loss = dispatch(i)
            jax.block_until_ready(loss)
            independent.append((time.perf_counter() - start) / n)
        out.append((point.describe(), statistics.median(ours), statistics.median(independent)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--points", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jaxscale-bench-"))
    cache = work / "cache"
    try:
        cold_wall, cold_csv = timed_run(args.profile, work / "cold", cache)
        warm_wall, warm_csv = timed_run(args.profile, work / "warm", cache)
        for label, wall, csv in (("cold cache", cold_wall, cold_csv), ("warm cache", warm_wall, warm_csv)):
            compile_s, recorded = recorded_work_s(csv)
            print(f"{label}: wall {wall:.1f} s; recorded compile {compile_s:.1f} s, compile + steps {recorded:.1f} s; "
                  f"tool overhead {(wall - recorded) / wall:.1%} of wall")
        print(f"compilation cache: warm run {cold_wall / warm_wall:.2f}x faster ({cold_wall:.1f} s -> {warm_wall:.1f} s)")
        print("step_time_s against an independent timing of the same executable (20 steps back to back, "
              "one block; median of 3 alternating rounds):")
        ratios = []
        for name, ours, independent in agreement(args.profile, args.points):
            ratios.append(ours / independent)
            print(f"  {name:<24} jaxscale {ours * 1e3:8.2f} ms  independent {independent * 1e3:8.2f} ms  "
                  f"ratio {ours / independent:.3f}")
        print(f"largest disagreement: {max(abs(r - 1) for r in ratios):.1%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
