"""`jaxscale run | plan | analyze | compare | devices | calibrate | profiles`: parse, call the library, print.

Exit codes: 0 all points ok, 1 some points failed (listed), 2 bad input (config.BadInput: a profile, a path, a
folder in use), 130 interrupted (Ctrl-C; the command that continues is printed). Modules that load JAX or pandas
are imported inside the commands; JAX only once startup.prepare_process has set XLA_FLAGS and JAX_PLATFORMS.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from jaxscale import distributed
from jaxscale.config import BadInput, ProfileError, load_profile
from jaxscale.folders import ReportDir, beside, check_output_dir, os_error_line, stamped
from jaxscale.grid import parse_selector
from jaxscale.options import build_parser, compare_sides
from jaxscale.startup import choose_isolation, ctrl_c_held, prepare_process
from jaxscale.targets import target_of


def _fail(message, code: int = 2) -> int:
    """One line on stderr; exit 2 for bad input, 1 for a failure that is not (a peer, a coordinator, a worker)."""
    print(f"jaxscale: error: {message}", file=sys.stderr)
    return code


def _interrupted(console, folder: Path | None, command: list[str], then: str = "continue with") -> int:
    """After Ctrl-C: where the rows are and the command that continues, never a traceback; exit 130."""
    from jaxscale.console import print_interrupted

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut this short
    print_interrupted(console, folder / "runs.csv" if folder is not None else None, command, then)
    return 130


def _claim_report(args, profile, recorded, held: list) -> None:
    """Claim the report folder into ``held``, whose owner releases it: a new one (never reused) or the --resume
    one. A Ctrl-C meanwhile is raised once it is there, so the folder is never left claimed by nobody."""
    from jaxscale.records import last_run_id

    with ctrl_c_held():
        held.append(ReportDir.reopen(args.resume, last_run_id(recorded)) if args.resume else ReportDir.for_run(
            profile.run.name, args.out))


def cmd_run(args) -> int:
    from rich.console import Console

    dist = distributed.Distributed.from_args(args)
    if dist.wanted and not distributed.supervised():
        return distributed.supervise(args.argv, dist)
    console, held = Console(), []  # held: the report folder once this process holds it
    try:
        if args.retry_failed and not args.resume:
            raise ProfileError("--retry-failed reruns the failed points of a recorded sweep: give it with "
                               "--resume REPORT_DIR")
        if args.resume:
            from jaxscale.console import warnings_as_lines
            from jaxscale.records import profile_to_resume

            with warnings_as_lines():
                profile, recorded = profile_to_resume(args.resume, args.profile, args.set or [], dist.wanted)
        else:
            profile, recorded = load_profile(args.profile or "smoke", args.set or []), None
        choose_isolation(profile.run)  # refuses flag sets without worker processes before a folder is made
        if args.trace:
            parse_selector(args.trace)  # its form now; whether it matches a point once the grid is known
        if not dist.wanted:  # one process: the folder is its own before any backend starts
            _claim_report(args, profile, recorded, held)
        elif args.out and not args.resume:
            check_output_dir(args.out)
        return _run(args, dist, profile, recorded, held, console)
    except KeyboardInterrupt:
        folder = held[0].path if held else None
        return _interrupted(console, folder, ["jaxscale", "run", "--resume", str(folder or args.resume)])
    finally:
        for report in held:
            report.discard()  # releases it; removes a folder this run created and recorded nothing in


def _run(args, dist, profile, recorded, held, console) -> int:
    prepare_process(not args.no_compile_cache)
    from jaxscale import sweep
    from jaxscale.console import point_progress, print_dropped, print_failures, print_runs

    try:
        runtime = sweep.open_runtime(profile, dist, compile_cache=not args.no_compile_cache)
    except distributed.SetupError as e:
        return _fail(e, 1)
    report_dir = Path(args.resume or args.out or "reports")
    try:
        console.quiet = not runtime.lead
        points, dropped = sweep.checked_grid(profile, runtime, args.trace, args.resume, recorded)
        if runtime.lead and not held:  # several hosts: process 0 holds the folder
            _claim_report(args, profile, recorded, held)
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
    except distributed.SetupError as e:
        return _fail(e, 1)
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
        return _interrupted(console, report_dir, ["jaxscale", "run", "--resume", str(report_dir)])
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


def cmd_analyze(args) -> int:
    from rich.console import Console

    from jaxscale.analyze import parse_expectation
    from jaxscale.console import warnings_as_lines
    from jaxscale.families import check_columns
    from jaxscale.records import load_tables

    source = ", ".join(args.csv)
    out = Path(args.out) if args.out else beside(args.csv[0], "analysis")
    check_output_dir(out)
    try:
        if not 0 < args.confidence < 1:
            raise ValueError(f"--confidence {args.confidence}: expected a number between 0 and 1, e.g. 0.95")
        if not (args.tolerance >= 0 and args.tolerance < float("inf")):
            raise ValueError(f"--tolerance {args.tolerance}: expected a finite number >= 0, e.g. 0.05")
        claims = [parse_expectation(text) for text in args.expect]
        with warnings_as_lines():
            rows, notes = load_tables(args.csv)
        for note in notes:
            print(f"jaxscale: note: {note}", file=sys.stderr)
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
    prepare_process(compile_cache=False)
    from jaxscale import devices
    from jaxscale.console import print_devices

    dist = distributed.Distributed.from_args(args)
    try:
        if dist.wanted:
            distributed.init_distributed(dist)
    except distributed.SetupError as e:
        return _fail(e, 1)
    print_devices(devices.describe(), devices.resolve_peak(args.dtype))
    return 0


def cmd_calibrate(args) -> int:
    prepare_process(compile_cache=False)
    from jaxscale import devices
    from jaxscale.console import print_calibration

    print_calibration(devices.calibrate(args.dtype, size=args.size), args.dtype)
    return 0


def cmd_compare(args) -> int:
    """Exit 0: nothing slower beyond the threshold; 1: something is (or fails now); 2: bad input."""
    base_paths, new_paths = compare_sides(args.reports, args.base, args.new)
    from jaxscale.comparison import compare_reports, gate_fails
    from jaxscale.console import print_comparison, warnings_as_lines
    from jaxscale.report import write_compare

    out = Path(args.out) if args.out else beside(new_paths[0], "compare")
    check_output_dir(out)
    with warnings_as_lines():
        table, diff, _, sources = compare_reports(base_paths, new_paths, threshold=args.threshold,
                                                  confidence=args.confidence, familywise=not args.per_point)
    try:
        paths = write_compare(out, table, diff, *sources)
    except OSError as e:
        return _fail(f"--out {out}: {os_error_line(e, str(out))}")
    print_comparison(table, diff, paths)
    return 1 if gate_fails(table) else 0


AGAIN = "plan again (a new folder) with"  # a plan is never resumed


def cmd_plan(args) -> int:
    from rich.console import Console

    console, held = Console(), []
    try:
        profile = load_profile(args.profile or "smoke", args.set or [])
        target = target_of(args.topology, profile.mesh.topology, profile.source)
        with ctrl_c_held():
            held.append(ReportDir.for_plan(profile.run.name, target.name, args.out))
        return _plan(args, profile, target, held[0].path, console)
    except KeyboardInterrupt:
        return _interrupted(console, held[0].path if held else None, ["jaxscale", *args.argv], AGAIN)
    finally:
        for report in held:
            report.discard()  # releases it; removes the folder when no point was planned


def _plan(args, profile, target, report_dir: Path, console) -> int:
    prepare_process(compile_cache=False, compile_only=True)
    from jaxscale import plan
    from jaxscale.console import point_progress, print_dropped, print_failures, print_plan

    try:
        points, dropped = plan.plan_grid(profile, target)
        if dropped:
            print_dropped(console, dropped, len(points))
        with point_progress(console, lambda p: f"{p.describe()} on {target.slice_for(p.n_devices)}") as callbacks:
            result = plan.run_plan(profile, target, report_dir, *callbacks,
                                   calibrate=Path(args.calibrate) if args.calibrate else None)
    except OSError as e:
        return _fail(f"{os_error_line(e, str(report_dir))}; free the space or fix the permissions, then plan again")
    print_plan(console, result.rows)
    console.print(f"rows: {report_dir / 'runs.csv'}", soft_wrap=True)
    if not args.no_analyze and result.fittable:
        _analyze_into(console, result.rows, report_dir, quiet_errors=True)
    if result.interrupted:
        return _interrupted(console, report_dir, ["jaxscale", *args.argv], AGAIN)
    return 1 if print_failures(console, result.failed) else 0


def cmd_profiles(args) -> int:
    """The shipped profiles, one line each: name, the command it is for, what it sweeps."""
    from jaxscale.config import profile_summary, shipped_profiles
    from jaxscale.console import print_profiles

    print_profiles([(name, *profile_summary(path)) for name, path in shipped_profiles().items()])
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "analyze": cmd_analyze, "compare": cmd_compare,
            "devices": cmd_devices, "calibrate": cmd_calibrate, "profiles": cmd_profiles}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except BadInput as e:  # a profile, a path, a target, a folder in use: nothing was half-written
        return _fail(e)
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing to keep: no traceback
        print("jaxscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
