"""jaxscale's train step against a plain JAX step of the same model, timed side by side.

The plain step (tests/plain_step.py) is written without jaxscale's code: what a
careful JAX user would write. Both run on one local device with the same dims,
dtype and attention, in alternating rounds (so that drift on the host hits both
alike); each round times ``--steps`` consecutive steps after warm-up. Prints,
per layer form, the median step of each and the ratio jaxscale / plain (target:
at most 1.05 on one CPU device, 1.03 on a GPU), and with ``--mfu`` the MFU of
both at the chip's datasheet peak.

    python benchmarks/peer_step.py                        # the profile defaults on one CPU device
    python benchmarks/peer_step.py --d-model 256 --layers 4
    python benchmarks/peer_step.py --d-model 2048 --layers 18 --heads 16 --seq 2048 --vocab 32768 \\
        --batch 8 --dtype bfloat16 --attention cudnn --mfu  # the 1b dims on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def peer_profile(args, scan: bool):
    from jaxscale.config import build_profile

    return build_profile({"run": {"dtype": args.dtype, "attention": args.attention, "scan_layers": scan},
                          "model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                                    "seq_len": args.seq, "vocab": args.vocab, "d_ff": 4 * args.d_model},
                          "batch": {"global_batch": args.batch},
                          "mesh": {"devices": [1], "strategies": ["dp"]}})


def compare(profile, rounds: int, steps: int) -> dict:
    """Median seconds per step of jaxscale's step and the plain one, and their compile times.

    Both steps are compiled, warmed up (two steps), then timed in ``rounds``
    alternating rounds of ``steps`` steps each, blocking on the last loss of a
    round; a round's figure is its wall time over ``steps``.
    """
    import jax
    import numpy as np

    from jaxscale.grid import build_grid
    from jaxscale.step import compile_point
    from plain_step import plain_train_step

    point = build_grid(profile, 1, 1)[0][0]
    m = point.model
    start = time.perf_counter()
    ours = compile_point(point, profile.run, jax.local_devices()[:1])
    ours_compile_s = time.perf_counter() - start
    state = dict(zip(("params", "opt"), ours.init_state()))
    batch = ours.make_batch(0)

    def run_ours():
        for _ in range(steps):
            state["params"], state["opt"], loss = ours.compiled(state["params"], state["opt"], batch)
        return loss

    init, step, _ = plain_train_step(m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab, profile.run.dtype,
                                  attention=ours.attention.impl)
    plain = dict(zip(("params", "opt"), init(jax.random.key(0))))
    tokens = jax.device_put(np.asarray(jax.device_get(batch)), jax.local_devices()[0])
    start = time.perf_counter()
    step = step.lower(plain["params"], plain["opt"], tokens).compile()
    plain_compile_s = time.perf_counter() - start

    def run_plain():
        for _ in range(steps):
            plain["params"], plain["opt"], loss = step(plain["params"], plain["opt"], tokens)
        return loss

    for fn in (run_ours, run_plain):
        for _ in range(2 if steps == 1 else 1):
            jax.block_until_ready(fn())
    samples = {"jaxscale": [], "plain": []}
    for _ in range(rounds):
        for name, fn in (("jaxscale", run_ours), ("plain", run_plain)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - start) / steps)
    return {"point": point, "attention": ours.attention.impl, "samples": samples,
            "jaxscale_s": statistics.median(samples["jaxscale"]), "plain_s": statistics.median(samples["plain"]),
            "jaxscale_compile_s": ours_compile_s, "plain_compile_s": plain_compile_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--forms", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mfu", action="store_true", help="print MFU at the chip's datasheet peak")
    args = parser.parse_args(argv)

    from jaxscale.targets import quiet_plugins

    quiet_plugins()
    import jax

    from jaxscale import flops
    from jaxscale.devices import spec_peak

    device = jax.local_devices()[0]
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; d_model {args.d_model}, "
          f"{args.layers} layers, {args.heads} heads, seq {args.seq}, vocab {args.vocab}, batch {args.batch}, "
          f"{args.dtype}; {args.rounds} alternating rounds of {args.steps} steps", flush=True)
    for form in args.forms:
        result = compare(peer_profile(args, form == "scan"), args.rounds, args.steps)
        ratio = result["jaxscale_s"] / result["plain_s"]
        line = (f"{form:>9}: jaxscale {result['jaxscale_s'] * 1e3:9.3f} ms  plain {result['plain_s'] * 1e3:9.3f} ms  "
                f"ratio {ratio:.3f}  (attention {result['attention']}; compile {result['jaxscale_compile_s']:.1f} s "
                f"vs {result['plain_compile_s']:.1f} s)")
        if args.mfu:
            m = result["point"].model
            model_flops = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, args.batch, m.d_ff,
                                            causal=True)
            peak = spec_peak(device.device_kind, device.platform, args.dtype)
            if peak and peak.tflops:
                line += (f"  MFU {model_flops / result['jaxscale_s'] / (peak.tflops * 1e12):.1%} vs "
                         f"{model_flops / result['plain_s'] / (peak.tflops * 1e12):.1%}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
