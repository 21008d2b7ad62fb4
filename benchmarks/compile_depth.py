"""Compile time and step time against depth, for each layer form.

For the local device (one of it) and, where libtpu is installed, a TPU
topology (compiled only: nothing runs there), prints per layer form
(``unrolled``: static slices of the stacked parameters, the default;
``scan``: one scanned layer) and depth (12, 24, 48 layers by default):

- compile_s: lower + compile of the train step, the persistent compilation
  cache off, so every compile is a real one;
- step_ms: the median of ``--steps`` timed steps after two warm-up steps
  (local device only);
- kernels: the program's kernel launches per step (hlo_cost.program_stats).

then the 48-layer over the 12-layer compile time of each form. The README's
layer-form trade-off quotes this table.

    python benchmarks/compile_depth.py                             # CPU + v5e:2x2
    python benchmarks/compile_depth.py --d-model 1024 --seq 1024 --dtype bfloat16 --topology ''   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time


def depth_profile(args, layers: int, scan: bool, n: int):
    from jaxscale.config import build_profile

    return build_profile({"run": {"dtype": args.dtype, "scan_layers": scan},
                          "model": {"d_model": args.d_model, "n_layers": layers, "n_heads": args.heads,
                                    "seq_len": args.seq, "vocab": args.vocab},
                          "batch": {"global_batch": args.batch * n},
                          "mesh": {"devices": [n], "strategies": ["dp" if n == 1 else "fsdp"]}})


def measure(args, layers: int, scan: bool, devices, run_steps: bool) -> dict:
    import jax

    from jaxscale.grid import build_grid
    from jaxscale.step import build_step, compile_step, compile_point

    profile = depth_profile(args, layers, scan, len(devices))
    point = build_grid(profile, len(devices), 1)[0][0]
    if not run_steps:
        start = time.perf_counter()
        _, _, _, _, _, text = compile_step(build_step(point, profile.run, devices), profile.run)
        return {"compile_s": time.perf_counter() - start, "step_ms": None,
                "kernels": _kernels(text)}
    start = time.perf_counter()
    step = compile_point(point, profile.run, devices)
    compile_s = time.perf_counter() - start
    params, opt = step.init_state()
    batch = step.make_batch(0)
    samples = []
    for i in range(2 + args.steps):
        start = time.perf_counter()
        params, opt, loss = step.compiled(params, opt, batch)
        jax.block_until_ready(loss)
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "step_ms": statistics.median(samples) * 1e3,
            "kernels": _kernels(step.hlo_text)}


def _kernels(text: str) -> int:
    from jaxscale import hlo_cost

    return hlo_cost.program_stats(text).kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2", help="TPU topology to compile for ('' to skip)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--forms", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="sequences per device")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from jaxscale import targets

    targets.quiet_plugins()
    import jax

    local = jax.local_devices()[:1]
    places = [(f"{local[0].platform}", local, True)]
    if args.topology and targets.libtpu_version():
        places.append((args.topology, list(targets.slice_devices(args.topology))[:4], False))
    print(f"d_model {args.d_model}, {args.heads} heads, seq {args.seq}, vocab {args.vocab}, {args.batch} "
          f"sequences per device, {args.dtype}; jax {jax.__version__}", flush=True)
    print(f"{'target':<10} {'form':<9} {'layers':>6} {'compile_s':>10} {'step_ms':>9} {'kernels':>8}", flush=True)
    for name, devices, run_steps in places:
        table = {}
        for form in args.forms:
            for layers in args.layers:
                r = measure(args, layers, form == "scan", devices, run_steps)
                table[form, layers] = r
                step = "" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
                print(f"{name:<10} {form:<9} {layers:>6} {r['compile_s']:>10.1f} {step:>9} {r['kernels']:>8}",
                      flush=True)
        lo, hi = min(args.layers), max(args.layers)
        growth = ", ".join(f"{form} {table[form, hi]['compile_s'] / table[form, lo]['compile_s']:.2f}x"
                           for form in args.forms)
        print(f"{name}: compile time {hi} layers / {lo} layers: {growth}", flush=True)


if __name__ == "__main__":
    main()
