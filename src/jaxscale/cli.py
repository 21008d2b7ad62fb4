"""`jaxscale run | plan | analyze | compare | devices | calibrate | profiles`: parse, call the library, print.

Exit codes: 0 all points ok, 1 some points failed (listed), 2 bad input (a profile, a path, a folder in use),
130 interrupted (Ctrl-C; the command that continues is printed). Nothing here imports JAX before a command
has set up the process (startup.prepare_process).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from pathlib import Path


def _fail(message) -> int:
    """Bad input: one line, exit 2."""
    print(f"jaxscale: error: {message}", file=sys.stderr)
    return 2


def _error(message) -> int:
    """A failure that is not bad input (a peer, a coordinator, a worker): one line, exit 1."""
    print(f"jaxscale: error: {message}", file=sys.stderr)
    return 1


def _note(message: str) -> None:
    print(f"jaxscale: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def _warnings_as_lines():
    """The library's warnings (a torn last line, a malformed row) as one line each, every time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:  # also those caught before an error
            for w in caught:
                print(f"jaxscale: warning: {w.message}", file=sys.stderr)


def _prepare(compile_cache: bool, compile_only: bool = False) -> None:
    from jaxscale.startup import prepare_process

    prepare_process(compile_cache, compile_only)


def _interrupted(console, report, command: list[str], then: str = "continue with") -> int:
    """After Ctrl-C: where the rows are and the command that continues, never a traceback; exit 130."""
    from jaxscale.console import print_interrupted

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut this short
    print_interrupted(console, report.path / "runs.csv" if report is not None else None, command, then)
    return 130


def _claim_report(args, profile, recorded):
    """The report folder, held by this process: a new one (never reused) or the --resume one."""
    from jaxscale.folders import ReportDir
    from jaxscale.records import last_run_id

    return ReportDir.reopen(args.resume, last_run_id(recorded)) if args.resume else ReportDir.for_run(
        profile.run.name, args.out)


def cmd_run(args) -> int:
    from rich.console import Console

    from jaxscale import distributed
    from jaxscale.config import ProfileError, load_profile
    from jaxscale.folders import ReportDirError, check_output_dir

    dist = distributed.Distributed.from_args(args)
    if dist.wanted and not distributed.supervised():
        return distributed.supervise(args.argv, dist)
    console, held = Console(), []  # held: the report folder once this process holds it
    try:
        try:
            if args.retry_failed and not args.resume:
                raise ProfileError("--retry-failed reruns the failed points of a recorded sweep: give it with "
                                   "--resume REPORT_DIR")
            if args.resume:
                from jaxscale.records import profile_to_resume

                with _warnings_as_lines():
                    profile, recorded = profile_to_resume(args.resume, args.profile, args.set or [], dist.wanted)
            else:
                profile, recorded = load_profile(args.profile or "smoke", args.set or []), None
            from jaxscale.startup import choose_isolation

            choose_isolation(profile.run)  # refuses flag sets without worker processes before a folder is made
            if not dist.wanted:  # one process: the folder is its own before any backend starts
                held.append(_claim_report(args, profile, recorded))
            elif args.out and not args.resume:
                check_output_dir(args.out)
        except (ProfileError, ReportDirError) as e:
            return _fail(e)
        return _run(args, dist, profile, recorded, held, console)
    except KeyboardInterrupt:
        folder = held[0].path if held else args.resume
        return _interrupted(console, held[0] if held else None, ["jaxscale", "run", "--resume", str(folder)])
    finally:
        for report in held:
            report.discard()  # releases it; removes a folder this run created and recorded nothing in


def _run(args, dist, profile, recorded, held, console) -> int:
    from jaxscale.config import ProfileError
    from jaxscale.folders import ReportDirError, os_error_line, stamped

    _prepare(not args.no_compile_cache)
    from jaxscale import sweep
    from jaxscale.console import point_progress, print_dropped, print_failures, print_runs
    from jaxscale.distributed import SetupError

    try:
        runtime = sweep.open_runtime(profile, dist, compile_cache=not args.no_compile_cache)
    except SetupError as e:
        return _error(e)
    report_dir = Path(args.resume or args.out or "reports")
    try:
        console.quiet = not runtime.lead
        try:
            points, dropped = sweep.grid_for(profile, runtime)
            if args.trace:
                sweep.check_trace(args.trace, points)
            if args.resume and runtime.lead:
                sweep.check_recorded_points(args.resume, profile, points, recorded)
            if runtime.lead and not held:  # several hosts: process 0 holds the folder
                held.append(_claim_report(args, profile, recorded))
        except (ProfileError, ReportDirError) as e:
            return _fail(e)
        # another host's process records nothing, and names traces as process 0 would
        report_dir = held[0].path if held else Path(args.resume or Path(args.out or "reports")
                                                    / stamped(profile.run.name))
        if dropped:
            print_dropped(console, dropped, len(points))
        with point_progress(console, lambda p: f"{p.describe():<28}", runtime.lead) as (on_point, on_row):
            result = sweep.run_profile(profile, report_dir, resume=bool(args.resume), retry_failed=args.retry_failed,
                                       trace=args.trace, on_point=on_point, on_row=on_row, runtime=runtime)
    except OSError as e:
        return _fail(f"{os_error_line(e, str(report_dir))}; rows finished before are kept: free the space or fix "
                     f"the permissions, then `jaxscale run --resume {report_dir}`")
    except SetupError as e:
        return _error(e)
    finally:
        runtime.close()
    if not runtime.lead:
        return 0 if not len(result.failed) else 1
    print_runs(console, result.rows)
    if result.skipped:
        console.print(f"{result.skipped} points were already recorded in {report_dir} and were skipped", soft_wrap=True)
    console.print(f"rows: {report_dir / 'runs.csv'}", soft_wrap=True)
    if not args.no_analyze and len(result.rows):
        _analyze_into(console, result.rows, report_dir, quiet_errors=True)
    if result.interrupted:
        return _interrupted(console, held[0], ["jaxscale", "run", "--resume", str(report_dir)])
    return 1 if print_failures(console, result.failed) else 0


def _analyze_into(console, rows, out_dir: Path, quiet_errors: bool = False, **options) -> None:
    """analyze.analyze_rows into out_dir, written and printed. With ``quiet_errors`` (the end of a run, whose
    rows are safe) rows that cannot share a fit are one warning line instead of a ValueError."""
    from jaxscale.analyze import analyze_rows
    from jaxscale.console import print_analysis
    from jaxscale.report import write_analysis

    try:
        analysis = analyze_rows(rows, **options)
    except ValueError as e:
        if not quiet_errors:
            raise
        print(f"jaxscale: warning: no analysis: {e}", file=sys.stderr)
        return
    write_analysis(out_dir, analysis, rows)
    print_analysis(console, analysis, rows, out_dir)


def _default_out(path: str, name: str) -> Path:
    """Beside the given report folder or CSV: PATH/name for a folder, else the CSV's folder/name."""
    return (Path(path) if Path(path).is_dir() else Path(path).resolve().parent) / name


def cmd_analyze(args) -> int:
    from rich.console import Console

    from jaxscale.analyze import parse_expectation
    from jaxscale.families import check_columns
    from jaxscale.folders import ReportDirError, check_output_dir, os_error_line
    from jaxscale.records import load_tables

    source = ", ".join(args.csv)
    out = Path(args.out) if args.out else _default_out(args.csv[0], "analysis")
    try:
        check_output_dir(out)
    except ReportDirError as e:
        return _fail(e)
    try:
        if not 0 < args.confidence < 1:
            raise ValueError(f"--confidence {args.confidence}: expected a number between 0 and 1, e.g. 0.95")
        if not (args.tolerance >= 0 and args.tolerance < float("inf")):
            raise ValueError(f"--tolerance {args.tolerance}: expected a finite number >= 0, e.g. 0.05")
        claims = [parse_expectation(text) for text in args.expect]
        with _warnings_as_lines():
            rows, notes = load_tables(args.csv)
        for note in notes:
            _note(note)
        check_columns(rows, source, x=args.x, ys=args.y or (), by=args.by, expectations=[c[:2] for c in claims],
                      higher_is_better=args.higher_is_better, lower_is_better=args.lower_is_better)
        directions = {**{c: "higher" for c in args.higher_is_better}, **{c: "lower" for c in args.lower_is_better}}
        _analyze_into(Console(), rows, out, x=args.x, ys=args.y or (), by=args.by, ideal=args.ideal,
                      directions=directions, expectations=args.expect, confidence=args.confidence,
                      tolerance=args.tolerance)
    except OSError as e:
        return _fail(f"--out {out}: {os_error_line(e, str(out))}")
    except ValueError as e:
        message = str(e)
        return _fail(message if message.startswith(tuple(args.csv)) else f"{source}: {message}")
    return 0


def cmd_devices(args) -> int:
    _prepare(compile_cache=False)
    from jaxscale import devices
    from jaxscale.console import print_devices
    from jaxscale.distributed import Distributed, SetupError, init_distributed

    dist = Distributed.from_args(args)
    try:
        if dist.wanted:
            init_distributed(dist)
    except SetupError as e:
        return _error(e)
    print_devices(devices.describe(), devices.resolve_peak(args.dtype))
    return 0


def cmd_calibrate(args) -> int:
    _prepare(compile_cache=False)
    from jaxscale import devices
    from jaxscale.console import print_calibration

    print_calibration(devices.calibrate(args.dtype, size=args.size), args.dtype)
    return 0


def cmd_compare(args) -> int:
    """Exit 0: nothing slower beyond the threshold; 1: something is (or fails now); 2: bad input."""
    if args.base or args.new:
        if args.reports or not (args.base and args.new):
            return _fail("give BASE NEW, or --base PATH [--base PATH ...] --new PATH [--new PATH ...], not a mix")
        base_paths, new_paths = args.base, args.new
    elif len(args.reports) == 2:
        base_paths, new_paths = [args.reports[0]], [args.reports[1]]
    else:
        return _fail(f"compare takes two reports, BASE NEW (got {len(args.reports)}); for several a side, "
                     "--base PATH [--base PATH ...] --new PATH [--new PATH ...]")
    from jaxscale.comparison import CompareError, compare_reports, gate_fails
    from jaxscale.console import print_comparison
    from jaxscale.folders import ReportDirError, check_output_dir, os_error_line
    from jaxscale.report import write_compare

    out = Path(args.out) if args.out else _default_out(new_paths[0], "compare")
    try:
        check_output_dir(out)
        with _warnings_as_lines():
            table, diff, shared, sources = compare_reports(base_paths, new_paths, threshold=args.threshold,
                                                           confidence=args.confidence, familywise=not args.per_point)
    except (CompareError, ReportDirError) as e:
        return _fail(e)
    if shared:
        print(f"jaxscale: warning: base and new hold the same run ({', '.join(shared[:3])}): its rows are compared "
              "with themselves, so every ratio is 1 and says nothing about a change", file=sys.stderr)
    try:
        paths = write_compare(out, table, diff, *sources)
    except OSError as e:
        return _fail(f"--out {out}: {os_error_line(e, str(out))}")
    print_comparison(table, diff, paths)
    return 1 if gate_fails(table) else 0


def cmd_plan(args) -> int:
    from rich.console import Console

    from jaxscale.config import ProfileError, load_profile
    from jaxscale.folders import ReportDir, ReportDirError
    from jaxscale.targets import TargetError, target_of

    console, held = Console(), []
    try:
        try:
            profile = load_profile(args.profile or "smoke", args.set or [])
            target = target_of(args.topology, profile.mesh.topology, profile.source)
            held.append(ReportDir.for_plan(profile.run.name, target.name, args.out))
        except (ProfileError, TargetError, ReportDirError) as e:
            return _fail(e)
        return _plan(args, profile, target, held[0].path, console)
    except KeyboardInterrupt:
        return _interrupted(console, held[0] if held else None, ["jaxscale", *args.argv],
                            "plan again (a new folder) with")
    finally:
        for report in held:
            report.discard()  # releases it; removes the folder when no point was planned


def _plan(args, profile, target, report_dir: Path, console) -> int:
    _prepare(compile_cache=False, compile_only=True)
    from jaxscale import plan
    from jaxscale.config import ProfileError
    from jaxscale.console import point_progress, print_dropped, print_failures, print_plan
    from jaxscale.folders import os_error_line

    try:
        points, dropped = plan.plan_grid(profile, target)
        if dropped:
            print_dropped(console, dropped, len(points))
        with point_progress(console, lambda p: f"{p.describe()} on {target.slice_for(p.n_devices)}") as callbacks:
            result = plan.run_plan(profile, target, report_dir, *callbacks,
                                   calibrate=Path(args.calibrate) if args.calibrate else None)
    except ProfileError as e:
        return _fail(e)
    except OSError as e:
        return _fail(f"{os_error_line(e, str(report_dir))}; free the space or fix the permissions, then plan again")
    print_plan(console, result.rows)
    console.print(f"rows: {report_dir / 'runs.csv'}", soft_wrap=True)
    if not args.no_analyze and result.fittable:
        _analyze_into(console, result.rows, report_dir, quiet_errors=True)
    return 1 if print_failures(console, result.failed) else 0


def build_parser() -> argparse.ArgumentParser:
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
    run.set_defaults(func=cmd_run)

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
    an.set_defaults(func=cmd_analyze)

    dev = sub.add_parser("devices", help="backend, devices and the peak jaxscale assumes")
    dev.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    distributed(dev)
    dev.set_defaults(func=cmd_devices)

    cal = sub.add_parser("calibrate", help="measure and cache a practical matmul peak and bandwidth")
    cal.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    cal.add_argument("--size", type=int, help="matrix size (default 1024 on CPU, 8192 elsewhere)")
    cal.set_defaults(func=cmd_calibrate)

    pl = sub.add_parser("plan", help="compile every grid point for a TPU slice and predict its step, no TPU needed",
                        description="Exit 0 when every point compiled (planned or over budget), 1 when one failed "
                                    "to compile, 2 for bad input.")
    profile_options(pl, 'run.remat=["none","full"]')
    pl.add_argument("--topology", help="the target: a TPU slice (v5e:16x16, v5p:4x4x4) or a GPU cluster as "
                                       "HOSTSxGPUS (h100:4x8, a100:1x8); default: the profile's [mesh] topology")
    pl.add_argument("--calibrate", metavar="RUN_DIR", help="fit the roofline's compute and memory efficiencies to "
                                                          "the measured steps of the target's chip in this run")
    pl.set_defaults(func=cmd_plan)

    prof = sub.add_parser("profiles", help="list the shipped profiles, one line each")
    prof.set_defaults(func=cmd_profiles)

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
    cmp.set_defaults(func=cmd_compare)
    return parser


def cmd_profiles(args) -> int:
    """The shipped profiles, one line each: name, the command it is for, what it sweeps."""
    from jaxscale.config import profile_summary, shipped_profiles
    from jaxscale.console import print_profiles

    print_profiles([(name, *profile_summary(path)) for name, path in shipped_profiles().items()])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing to keep: no traceback
        print("jaxscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
