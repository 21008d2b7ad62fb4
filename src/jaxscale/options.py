"""The command line's words: each command, its options, their defaults and help (argparse).

cli.py runs the command the parser names in ``args.command``; ``jaxscale COMMAND --help`` prints what is here.
Checks of how options combine that argparse cannot express live here too (compare_sides).
"""

from __future__ import annotations

import argparse

from jaxscale.config import BadInput


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; ``args.command`` names the one given."""
    parser = argparse.ArgumentParser(prog="jaxscale", description="How does a transformer training step scale?")
    sub = parser.add_subparsers(dest="command", required=True)

    def distributed(p):
        g = p.add_argument_group("several hosts (jax.distributed)")
        g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
        g.add_argument("--num-processes", type=int)
        g.add_argument("--process-id", type=int)
        g.add_argument("--distributed", choices=("auto", "off"), default="auto",
                       help="auto: initialize jax.distributed where JAX detects a cluster (Cloud TPU, SLURM, MPI)")
        g.add_argument("--timeout", type=int, default=120,
                       help="seconds to wait for the coordinator and peers (default 120)")

    def profile_options(p, example: str):
        p.add_argument("profile", nargs="?", help="shipped profile name or path (default: smoke)")
        p.add_argument("--out", help="parent folder of the report folder (default: reports/)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help=f"override a profile value, TOML syntax: --set {example}")
        p.add_argument("--no-compile-cache", action="store_true", help="do not use JAX's persistent compilation cache")
        p.add_argument("--no-analyze", action="store_true", help="skip the fits at the end")

    run = sub.add_parser("run", help="run a sweep profile and write runs.csv")
    profile_options(run, "model.d_model=[512,1024]")
    run.add_argument("--resume", metavar="REPORT_DIR", help="continue the sweep recorded in REPORT_DIR")
    run.add_argument("--retry-failed", action="store_true", help="with --resume, rerun points that failed")
    run.add_argument("--trace", metavar="SELECTOR", help="jax.profiler trace of points matching e.g. strategy=fsdp,n_devices=8")
    distributed(run)

    an = sub.add_parser("analyze", help="fit power laws to runs.csv or any CSV")
    an.add_argument("csv", nargs="+", help="runs.csv files or any CSV")
    an.add_argument("--out", help="output folder (default: beside the first CSV, analysis/)")
    an.add_argument("--x", help="x column (any CSV)")
    an.add_argument("--y", action="append", help="y column(s) (any CSV)")
    an.add_argument("--by", action="append", default=[], help="group column(s)")
    an.add_argument("--ideal", type=float, help="ideal exponent for --x/--y fits (default: relative to 1)")
    an.add_argument("--expect", action="append", default=[], metavar="Y:X=B",
                    help="test a claimed exponent, e.g. step_time_s:params=1.5")
    an.add_argument("--confidence", type=float, default=0.95)
    an.add_argument("--tolerance", type=float, default=0.05,
                    help="half-width of the band around each ideal exponent (default 0.05): an interval inside it "
                         "is 'as ideal', wholly outside 'better'/'worse', else 'inconclusive'")
    an.add_argument("--higher-is-better", action="append", default=[], metavar="COL",
                    help="a --y column where larger is better (throughput); by default *_per_s")
    an.add_argument("--lower-is-better", action="append", default=[], metavar="COL",
                    help="a --y column that is a cost; by default *_s times and *_bytes")

    dev = sub.add_parser("devices", help="backend, devices and the peak jaxscale assumes")
    dev.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    distributed(dev)

    cal = sub.add_parser("calibrate", help="measure and cache a practical matmul peak and bandwidth")
    cal.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    cal.add_argument("--size", type=int, help="matrix size (default 1024 on CPU, 8192 elsewhere)")

    pl = sub.add_parser("plan", help="compile every grid point for a TPU slice and predict its step, no TPU needed",
                        description="Exit 0 when every point compiled (planned or over budget), 1 when one failed "
                                    "to compile, 2 for bad input.")
    profile_options(pl, 'run.remat=["none","full"]')
    pl.add_argument("--topology", help="the target: a TPU slice (v5e:16x16, v5p:4x4x4) or a GPU cluster as "
                                       "HOSTSxGPUS (h100:4x8, a100:1x8); default: the profile's [mesh] topology")
    pl.add_argument("--calibrate", metavar="RUN_DIR", help="fit the roofline's compute and memory efficiencies to "
                                                          "the measured steps of the target's chip in this run")

    sub.add_parser("profiles", help="list the shipped profiles, one line each")

    cmp = sub.add_parser("compare", help="match two runs point by point: step-time ratios with intervals, verdicts",
                         description="Exit 0 when no point is slower beyond the threshold, 1 when one is (or fails "
                                     "where it ran before), 2 for bad input.")
    cmp.add_argument("reports", nargs="*", metavar="BASE NEW", help="report folders or runs.csv files")
    cmp.add_argument("--base", action="append", default=[], metavar="PATH",
                     help="a base report folder or runs.csv; repeat for several runs (with 3 or more a side, "
                          "the interval is taken over the runs)")
    cmp.add_argument("--new", action="append", default=[], metavar="PATH", help="a new report folder or runs.csv")
    cmp.add_argument("--threshold", type=float, default=0.05,
                     help="relative change in step time that matters (default 0.05: 5%%)")
    cmp.add_argument("--confidence", type=float, default=0.95,
                     help="coverage of all the ratio intervals together (default 0.95)")
    cmp.add_argument("--per-point", action="store_true",
                     help="each interval at --confidence on its own, not all together: finds smaller changes, "
                          "and calls some point of an unchanged grid slower or faster more often")
    cmp.add_argument("--out", help="output folder (default: NEW/compare)")
    return parser


def compare_sides(reports: list, base: list, new: list) -> tuple[list, list]:
    """`jaxscale compare`'s base and new paths, given as BASE NEW (``reports``) or as ``--base``/``--new`` lists.

    Raises:
      BadInput: a mix of the two forms, or other than two reports.
    """
    if base or new:
        if reports or not (base and new):
            raise BadInput("give BASE NEW, or --base PATH [--base PATH ...] --new PATH [--new PATH ...], not a mix")
        return list(base), list(new)
    if len(reports) != 2:
        raise BadInput(f"compare takes two reports, BASE NEW (got {len(reports)}); for several a side, "
                       "--base PATH [--base PATH ...] --new PATH [--new PATH ...]")
    return [reports[0]], [reports[1]]
