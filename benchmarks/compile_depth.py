"""Compile time against depth: scanned layers stay nearly flat, unrolled ones grow.

Prints, for the CPU (the local devices) and for a TPU topology (compiled with
libtpu, nothing run), the lower + compile time of a point's train step at 12,
24 and 48 layers with ``scan_layers`` on and off, and the 48-layer time over
the 12-layer time (the target for scanned layers is at most 1.5x). The
persistent compilation cache is off, so every compile is a real one.

    python benchmarks/compile_depth.py [--topology v5e:2x2] [--layers 12 24 48] [--no-unrolled]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_seconds(layers: int, scan: bool, devices, strategy: str, n: int) -> float:
    from jaxscale.config import build_profile
    from jaxscale.grid import build_grid
    from jaxscale.step import build_step

    profile = build_profile({"run": {"dtype": "bfloat16", "scan_layers": scan},
                             "model": {"d_model": 256, "n_layers": layers, "n_heads": 8, "seq_len": 256,
                                       "vocab": 1024},
                             "batch": {"per_device_batch": 2},
                             "mesh": {"devices": [n], "strategies": [strategy]}})
    point = build_grid(profile, len(devices))[0][0]
    start = time.perf_counter()
    program = build_step(point, profile.run, devices)
    program.jitted.lower(*program.abstract_args).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2", help="TPU topology to compile for ('' to skip)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument("--no-unrolled", action="store_true", help="time scanned layers only")
    args = parser.parse_args()

    from jaxscale import targets

    targets.quiet_tpu_runtime()
    import jax

    targets_ = [("cpu", jax.devices()[:4])]
    if args.topology and targets.libtpu_version():
        targets_.append((args.topology, list(targets.slice_devices(args.topology))[:4]))
    print(f"{'target':<10} {'layers':>6} {'scan_s':>8} {'unrolled_s':>11}")
    for name, devices in targets_:
        times = {}
        for layers in args.layers:
            scanned = compile_seconds(layers, True, devices, args.strategy, 4)
            unrolled = None if args.no_unrolled else compile_seconds(layers, False, devices, args.strategy, 4)
            times[layers] = (scanned, unrolled)
            print(f"{name:<10} {layers:>6} {scanned:>8.1f} {'' if unrolled is None else f'{unrolled:.1f}':>11}",
                  flush=True)
        lo, hi = min(args.layers), max(args.layers)
        ratio = times[hi][0] / times[lo][0]
        line = f"{name}: scanned {hi} layers / {lo} layers = {ratio:.2f}x (target <= 1.5x)"
        if times[hi][1] is not None:
            line += f"; unrolled {times[hi][1] / times[lo][1]:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
