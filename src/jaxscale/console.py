"""The terminal: tables, the CLI's printers and progress bar, and the cell texts and labels every output shares.

On a terminal a table is a rich Table fitted to its width (the least needed
columns left out and named, long notes numbered under it); off one (a pipe, a
CI log) the same cells print as plain full-width text, nothing cut. The cell
formatters and the labels of fits, groups and compared points here are those
of summary.md, compare.md and the plots too.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from jaxscale.comparison import TIMING_VERDICTS, counts, matched
from jaxscale.families import SHARED_HOST_NOTE, succeeded, why_no_fits
from jaxscale.records import MATCH_COLUMNS
from jaxscale.startup import cache_dir

# Size dimensions are summarized by size_name in labels when both are group columns.
_SIZE_DIMS = ("d_model", "n_layers", "n_heads", "d_ff", "vocab", "params")
# Group values shown bare in labels; others as column=value.
_BARE = ("size_name", "strategy", "batch_mode", "dtype", "backend", "device_kind", "row_source")


def cell_number(value, pattern: str) -> str:
    """``pattern.format(value)`` for a table cell; '' where the value is missing or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if value != value else pattern.format(value)


def cell_bytes(value, signed: bool = False) -> str:
    """Bytes in binary units for a table cell (``+1.5 MiB`` with ``signed``, for changes); '' where missing."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    if value != value:
        return ""
    sign = ("-" if value < 0 else "+") if signed else ""
    value = abs(value) if signed else value
    if signed and not value:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{sign}{value:.3g} {unit}"
        value /= 1024
    return ""


def cell_format(value, spec: str = ".3g") -> str:
    """A number for a table cell: '' for missing, integers without a decimal point under spec 'g'."""
    if value is None or isinstance(value, str) or pd.isna(value):
        return "" if not isinstance(value, str) else value
    if spec == "g" and float(value).is_integer():
        return str(int(value))
    return format(float(value), spec)


def cell_text(value) -> str:
    """The value where it is text (a verdict, a note), else ''."""
    return value if isinstance(value, str) else ""


def cell_note(value) -> str:
    """A note for a table cell; the shared-host caveat, stated once at the top, is shortened."""
    return cell_text(value).replace(SHARED_HOST_NOTE, "shared host (see top)")


def cell_value(value) -> str:
    """A group value for a label: a number as cell_format gives it under spec 'g', anything else as str."""
    return cell_format(value, "g") if isinstance(value, (int, float, np.number)) else str(value)


def by_names(rows: pd.DataFrame) -> list[str]:
    """The group columns named in the rows' ``by`` column (comma-separated)."""
    return [c for text in rows.get("by", pd.Series(dtype=str)).dropna().unique() for c in str(text).split(",") if c]


def group_columns(rows: pd.DataFrame, by: list[str] | None = None) -> tuple[list[str], str]:
    """(group columns that tell these rows apart, 'col=value, ...' for those fixed across them).

    ``by`` defaults to the names in the rows' ``by`` column. Size dimensions are
    left to size_name when it is among the group columns.
    """
    by = by_names(rows) if by is None else by
    by = [c for c in dict.fromkeys(by) if c in rows.columns and not ("size_name" in by and c in _SIZE_DIMS)]
    varying = [c for c in by if rows[c].nunique(dropna=False) > 1]
    fixed = [f"{c}={cell_value(rows[c].dropna().iloc[0])}" for c in by if c not in varying and rows[c].notna().any()]
    return varying, ", ".join(fixed)


def group_label(row, columns: list[str]) -> str:
    """The row's values of columns as a label (column=value, or bare for names and kinds); 'all' for none."""
    parts = [cell_value(row[c]) if c in _BARE else f"{c}={cell_value(row[c])}" for c in columns if not pd.isna(row[c])]
    return " ".join(parts) or "all"


def exponent_text(row) -> tuple[str, str]:
    """('b ± half-width', '[low, high]'), or empty strings without a fit."""
    if pd.isna(row["exponent"]):
        return "", ""
    half = (row["ci_high"] - row["ci_low"]) / 2
    return f"{row['exponent']:+.3f} ± {half:.3f}", f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def fit_sections(fits: pd.DataFrame) -> list[tuple[str | None, str, pd.DataFrame]]:
    """(family, title, rows) per family (per x when there is no family column), in order of appearance."""
    key = fits["family"] if "family" in fits.columns else fits["x"]
    out = []
    for name in dict.fromkeys(key):
        rows = fits[key == name]
        if "family" in fits.columns:
            out.append((name, f"{name}: y against {', '.join(dict.fromkeys(rows['x']))}", rows))
        else:
            out.append((None, f"y against {name}", rows))
    return out


def first_value(frame: pd.DataFrame | None, column: str, default):
    """The first value of a column that is not missing; default where there is none (or no frame)."""
    if frame is None or column not in frame.columns or not frame[column].notna().any():
        return default
    return frame[column].dropna().iloc[0]


# ------------------------------------------------------------ labels of compared points


LABEL_COLUMNS = ("size_name", "strategy", "n_devices")


def varying_key_columns(table: pd.DataFrame) -> list[str]:
    """The key columns that tell apart points sharing a size, strategy and device count (a batch list, remat
    policies, XLA flag sets): what a point's label needs beyond those three."""
    key = table.attrs.get("key", MATCH_COLUMNS)
    groups = [c for c in LABEL_COLUMNS if c in table.columns]
    out = []
    for c in key:
        if c in LABEL_COLUMNS or c not in table.columns:
            continue
        spread = table.groupby(groups, dropna=False)[c].nunique(dropna=False) if groups else \
            pd.Series([table[c].nunique(dropna=False)])
        if (spread > 1).any():
            out.append(c)
    return out


def point_label(r, extra) -> str:
    """A compared point as text: size, strategy, device count, then the columns of extra that are set."""
    parts = [f"{r['size_name']} {r['strategy']} n={r['n_devices']}" if "size_name" in r
             else f"{r['strategy']} n={r['n_devices']}"]
    parts += [f"{c}={r[c]}" for c in extra if str(r[c]) != ""]
    return " ".join(parts)


# ------------------------------------------------------------ tables


WRAP_MIN_WIDTH = 24  # a wrapped column (a note, a group) is never squeezed below this many characters


def console_table(title: str, headers: list[str], cells: list[list[str]], left=(), wrap=(), optional=(),
                  width: int | None = None, footnote: str | None = None) -> Table:
    """Cells as a rich Table that fits ``width`` terminal columns without cutting a cell.

    Every column keeps each cell on one line except those in ``wrap`` (text
    wrapped at spaces, WRAP_MIN_WIDTH wide or as wide as its widest cell if
    that is narrower). Where the table is wider than ``width``: the columns in
    ``optional`` are left out in that order (least needed first); then the
    ``footnote`` column's texts move under the table, numbered, the column
    keeping their numbers; the caption says both. Cells may hold rich markup.

    Args:
      headers, cells: column names and rows of cell texts.
      left: columns aligned left (the rest right).
      width: the terminal's width; None for no limit.
    """
    from rich import box
    from rich.text import Text

    def build(shown: list[int], rows: list[list[str]], measuring: bool, fold_all: bool = False) -> Table:
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False,
                      collapse_padding=True)
        for i in shown:
            name = headers[i]
            wrapped = name in wrap or fold_all
            shortest = min(WRAP_MIN_WIDTH, max(_longest(rows, i), len(name))) if wrapped else None
            if name in wrap and not fold_all:  # a wrapped text keeps its room: never squeezed to its longest word
                shortest = min(WRAP_MIN_WIDTH, max(_widest(rows, i), len(name)))
            table.add_column(name, justify="left" if name in left else "right", no_wrap=not wrapped,
                             overflow="fold", max_width=shortest if measuring else None, min_width=shortest)
        for line in rows:
            table.add_row(*[line[i] for i in shown])
        return table

    def fits(shown: list[int], rows: list[list[str]]) -> bool:
        import io

        from rich.console import Console

        if width is None:
            return True
        probe = Console(file=io.StringIO(), width=100_000, color_system=None)
        probe.print(build(shown, rows, True))
        return max(Text.from_ansi(line).cell_len for line in probe.file.getvalue().splitlines()) <= width

    shown = list(range(len(headers)))
    dropped = []
    for name in optional:
        if fits(shown, cells):
            break
        if name in headers and headers.index(name) in shown:
            shown.remove(headers.index(name))
            dropped.append(name)
    notes: list[str] = []
    if not fits(shown, cells) and footnote in headers and headers.index(footnote) in shown:
        column = headers.index(footnote)
        numbered = []
        for line in cells:
            text = line[column]
            if text and text not in notes:
                notes.append(text)
            numbered.append([*line[:column], str(notes.index(text) + 1) if text else "", *line[column + 1:]])
        cells = numbered
    # Still too wide (a very long name): fold cells onto more lines rather than crop them.
    table = build(shown, cells, False, fold_all=not fits(shown, cells))
    caption = []
    if dropped:
        caption.append(f"left out at {width} columns: {', '.join(dropped)} (all in the CSV)")
    if notes:
        caption += [f"{footnote}s:"] + [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    if caption:
        table.caption = "\n".join(caption)
        table.caption_justify = "left"
    return table


def _widest(cells: list[list[str]], i: int) -> int:
    """The widest cell of column i, as shown."""
    from rich.text import Text

    return max((Text.from_markup(line[i]).cell_len for line in cells), default=1)


def _longest(cells: list[list[str]], i: int) -> int:
    """The longest word of column i (a wrapped column need not be narrower)."""
    from rich.text import Text

    words = [w for line in cells for w in Text.from_markup(line[i]).plain.split()]
    return max((len(w) for w in words), default=1)


# Fit-table columns, and those left out first on a narrow terminal.
FIT_CONSOLE_HEADERS = ["family", "y", "x", "group", "exponent", "CI", "ideal", "assessment", "regime", "curve", "n",
                       "note"]


FIT_CONSOLE_OPTIONAL = ("CI", "curve", "regime", "x", "family", "ideal", "n")


def fits_console_table(fits: pd.DataFrame, width: int | None = None) -> Table:
    """The fits as a rich Table for a terminal of ``width`` columns (one row per fit, notes last, wrapped).

    On a narrow terminal the columns in FIT_CONSOLE_OPTIONAL are left out, in
    that order, until the rest fit whole (see ``console_table``).
    """
    cells = []
    for family, _, rows in fit_sections(fits):
        columns = group_columns(rows)[0]
        for _, row in rows.iterrows():
            b, ci = exponent_text(row)
            verdict = cell_text(row.get("assessment", ""))
            style = {"worse than ideal": "yellow", "better than ideal": "cyan", "inconclusive": "dim"}.get(verdict, "")
            cells.append([family or "", row["y"], row["x"], _escape(group_label(row, columns)), b, ci,
                          cell_format(row["ideal_exponent"], "g"), f"[{style}]{verdict}[/]" if style else verdict,
                          cell_text(row["regime"]), cell_text(row.get("curvature", "")),
                          cell_format(row["n_points"], "g"), _escape(cell_note(row["note"]))])
    return console_table("power-law fits  y = a·x^b", FIT_CONSOLE_HEADERS, cells,
                         left={"family", "y", "x", "group", "assessment", "regime", "curve", "note"},
                         wrap={"group", "note"}, optional=FIT_CONSOLE_OPTIONAL, width=width,
                         footnote="note")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ------------------------------------------------------------ printers of the CLI


def print_failures(console, failed) -> int:
    """A line per failed row (point, status, the error's start) under a count; returns the count."""
    if len(failed):
        console.print(f"[red]{len(failed)} point(s) failed:[/red]")
        for _, r in failed.iterrows():
            console.print(f"  {r['size_name']} {r['strategy']} n={r['n_devices']}: {r['status']}: "
                          f"{str(r['error'])[:200]}", markup=False)
    return len(failed)


def print_dropped(console, dropped, kept: int) -> None:
    total = sum(dropped.values()) + kept
    console.print(f"[yellow]{sum(dropped.values())} of {total} grid points dropped:[/yellow]")
    for reason, count in dropped.items():
        console.print(f"  {count} x {reason}", markup=False)


def print_runs(console, rows) -> None:
    """A short table of the sweep's rows: rich on a terminal, plain full-width text elsewhere.

    Off a terminal (a pipe, a CI log) rich would squeeze the table into 80
    columns and cut its cells; the plain table keeps every cell whole. On a
    narrow terminal the least needed columns are left out instead of cutting cells.
    """
    headers, cells = _runs_cells(rows)
    print_cells(console, "jaxscale runs", headers, cells, {"size", "strategy", "mesh", "status", "remat", "xla_flags"},
                 optional=("mesh", "params", "tokens/s", "cv", "xla_flags", "remat", "mem/device"))


def print_cells(console, title: str, headers: list[str], cells: list[list[str]], left: set[str],
                 optional=(), wrap=()) -> None:
    """Cells as a rich Table fitted to the terminal, else as plain full-width text."""
    from rich.markup import escape

    cells = [[escape(c) for c in line] for line in cells]
    table = console_table(title, headers, cells, left=left, wrap=wrap, optional=optional,
                          width=console.width if console.is_terminal else None)
    print_table(console, table)


def _runs_cells(rows) -> tuple[list[str], list[list[str]]]:
    """Column names and cell texts of the runs table; remat and xla_flags only where they vary."""
    headers = ["size", "strategy", "n", "mesh", "params", "step_time_s", "cv", "tokens/s", "mfu", "mem/device",
               "status"]
    extra = [c for c in ("remat", "xla_flags") if c in rows.columns and rows[c].astype(str).nunique() > 1]
    cells = []
    for _, r in rows.iterrows():
        ok = r["status"] == "ok"
        mem = r.get("peak_bytes_in_use")
        if mem is None or mem == "" or (isinstance(mem, float) and mem != mem):
            mem = r.get("compiled_total_bytes")
        cells.append([str(r["size_name"]), str(r["strategy"]), str(r["n_devices"]), str(r["mesh_shape"]),
                      cell_number(r.get("params"), "{:.3g}"), cell_number(r.get("step_time_s"), "{:.4g}") if ok else "",
                      cell_number(r.get("step_time_cv"), "{:.1%}") if ok else "",
                      cell_number(r.get("tokens_per_s"), "{:.4g}") if ok else "",
                      cell_number(r.get("mfu"), "{:.1%}") if ok else "", cell_bytes(mem), str(r["status"]),
                      *[str(r[c]) if r[c] is not None and r[c] == r[c] else "" for c in extra]])
    return headers + extra, cells


def print_table(console, table) -> None:
    """A rich Table on a terminal; off one, the same cells as plain full-width text a log keeps whole."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.text import Text

    headers = [str(c.header) for c in table.columns]
    columns = [[Text.from_markup(str(cell)).plain for cell in c.cells] for c in table.columns]
    left = {str(c.header) for c in table.columns if c.justify == "left"}
    if table.title:
        print(table.title, file=console.file)
    print(_plain_table(headers, [list(r) for r in zip(*columns)], left), file=console.file, flush=True)


def _plain_table(headers: list[str], cells: list[list[str]], left: set[str]) -> str:
    """Columns padded to their widest cell, two spaces apart, nothing cut."""
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def line(texts):
        return "  ".join(t.ljust(w) if h in left else t.rjust(w)
                         for t, w, h in zip(texts, widths, headers)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def print_plan(console, rows) -> None:
    """The plan's rows: what fits, predicted step time and MFU, plain text off a terminal."""
    headers = ["size", "strategy", "n", "slice", "batch", "remat", "status", "state/chip", "total/chip", "of HBM",
               "compute_s", "comm_s", "step_s", "mfu"]
    cells = []
    for _, r in rows.iterrows():
        hbm = r.get("device_memory_bytes")
        total = r.get("compiled_total_bytes")
        share = cell_number(float(total) / float(hbm), "{:.0%}") if cell_number(total, "{}") and cell_number(hbm, "{}") else ""
        state = (r.get("param_bytes") or 0) + (r.get("opt_state_bytes") or 0)
        cells.append([str(r["size_name"]), str(r["strategy"]), str(r["n_devices"]), str(r.get("topology") or ""),
                      str(r["global_batch"]), str(r.get("remat") or ""), str(r["status"]), cell_bytes(state or None),
                      cell_bytes(total), share, cell_number(r.get("predicted_compute_s"), "{:.3g}"),
                      cell_number(r.get("predicted_comm_s"), "{:.3g}"), cell_number(r.get("predicted_step_time_s"), "{:.3g}"),
                      cell_number(r.get("predicted_mfu"), "{:.1%}")])
    print_cells(console, "jaxscale plan", headers, cells, {"size", "strategy", "slice", "remat", "status"},
                 optional=("compute_s", "comm_s", "state/chip", "batch", "remat", "slice", "of HBM"))


def method_line(table: pd.DataFrame) -> str:
    """One sentence: how the ratios, intervals and verdicts of the table were made."""
    confidence = table.attrs.get("confidence", 0.95)
    level = table.attrs.get("point_confidence", confidence)
    threshold = table.attrs.get("threshold", 0.05)
    if not table["interval_over"].notna().any():
        return (f"ratio = new / base step time, threshold ±{threshold:.1%}; no intervals: "
                "no point has measured samples on both sides")
    together = (f"{confidence:.0%} for all points together ({level:.2%} each)" if table.attrs.get("familywise", True)
                else f"{confidence:.0%} each, not simultaneous")
    parts = []
    if (table["interval_over"] == "steps").any():
        parts.append("over steps: Hodges–Lehmann ratio, Moses (Mann–Whitney) interval")
    if (table["interval_over"] == "runs").any():
        parts.append("over 3 or more runs a side: ratio of the geometric means of run medians, Welch t interval")
    text = f"ratio = new / base step time; {'; '.join(parts)}; intervals {together}; threshold ±{threshold:.1%}"
    drift = table.attrs.get("run_drift")
    if drift is not None:
        if drift.sd == drift.sd:
            text += (f"; drift between runs {drift.sd:.3f} (log-scale SD, from {drift.n_points - drift.n_outliers}"
                     f" of {drift.n_points} points) widens the intervals over steps")
        else:
            text += "; too few points to estimate the drift between runs: intervals over steps cover steps only"
    return text


def print_comparison(table: pd.DataFrame, diff: pd.DataFrame, paths: dict) -> None:
    """The comparison in a few lines: runtime changes, the method, verdict counts, each slower or failed point."""
    main = diff[diff["main"]] if len(diff) else diff
    if main.empty:
        print("runtime: the same versions, devices, processes, flags and peak")
    else:
        print("runtime: " + "; ".join(f"{r.field} {r.base} -> {r.new}" for r in main.itertuples()))
    tally = counts(table)
    print(method_line(table))
    print(f"{matched(table)} points matched: "
          + ", ".join(f"{c} {v}" for v, c in tally.items() if c or v in TIMING_VERDICTS))
    extra = varying_key_columns(table)
    for _, r in table[table["verdict"].isin(("slower", "failed"))].iterrows():
        interval = (f" [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]" if r["verdict"] == "slower"
                    and r["ratio_ci_low"] == r["ratio_ci_low"] else "")
        detail = f"{r['ratio']:.3f}x{interval}" if r["verdict"] == "slower" else r["note"]
        print(f"  {r['verdict']}: {point_label(r, extra)}: {detail}")
    print("compare: " + ", ".join(str(p) for p in paths.values()), flush=True)


def print_analysis(console, analysis, rows: pd.DataFrame, out_dir) -> None:
    """An analyze.Analysis on the terminal: values left out of the fits, why there are none, the fits table,
    and where the files are."""
    for column, count in analysis.unusable.items():
        print(f"jaxscale: note: {column}: {count} row(s) with a value <= 0 or infinite left out of the fits",
              file=sys.stderr)
    fits = analysis.fits
    if fits.empty or not succeeded(rows).any():
        print(f"jaxscale: note: no fits: {why_no_fits(rows)}", file=sys.stderr)
    if not fits.empty:
        print_table(console, fits_console_table(fits, console.width if console.is_terminal else None))
    out_dir = Path(out_dir)
    console.print(f"fits: {out_dir / 'fits.csv'}, summary: {out_dir / 'summary.md'}, plots: {out_dir / 'plots'}",
                  soft_wrap=True)


@contextlib.contextmanager
def point_progress(console, label, enabled: bool = True):
    """A progress bar over a sweep's or a plan's points: yields their (on_point, on_row) callbacks.

    ``label(point)`` names the point being measured or planned.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not enabled) as progress:
        task = progress.add_task("starting", total=None)

        def on_point(point, i: int, total: int) -> None:
            progress.update(task, total=total, completed=i, description=label(point))

        yield on_point, lambda row: progress.advance(task)
        progress.update(task, description="done")


@contextlib.contextmanager
def warnings_as_lines():
    """The library's warnings (a torn last line, a malformed row) as one line each, every time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:  # also those caught before an error
            for w in caught:
                print(f"jaxscale: warning: {w.message}", file=sys.stderr)


def print_interrupted(console, csv_path: Path | None, command: list[str], then: str = "continue with") -> None:
    """After Ctrl-C: how many rows were kept where, and the command that continues (unwrapped, to copy)."""
    rows = len(csv_path.read_bytes().splitlines()) - 1 if csv_path is not None and csv_path.exists() else 0
    if rows <= 0:
        print("jaxscale: interrupted before any point finished; nothing was recorded", file=sys.stderr)
        return
    console.print(f"[yellow]interrupted; {rows} row(s) kept in {csv_path}; {then}:[/yellow]", soft_wrap=True)
    print(shlex.join(command), flush=True)


def print_calibration(result: dict, dtype: str) -> None:
    """`jaxscale calibrate`: the practical matmul peak and memory bandwidth measured, and where they are cached."""
    print(f"measured {result['tflops']:.4g} TFLOP/s per device ({dtype} {result['size']}^3 matmul on "
          f"{result['n_local_devices']} devices at once), memory {result['hbm_gbytes_per_s']:.4g} GB/s per device; "
          f"cached in {cache_dir() / 'calibration.json'}")


def print_profiles(summaries: list[tuple[str, str, str]]) -> None:
    """`jaxscale profiles`: one line per shipped profile (name, the command it is for, what it sweeps)."""
    width = max(len(name) for name, *_ in summaries)
    for name, command, text in summaries:
        print(f"{name:<{width}}  {command:<4}  {text}")


def print_devices(info: dict, peak) -> None:
    """`jaxscale devices`: the backend, devices and host (devices.describe), then the peak jaxscale assumes."""
    for key, value in info.items():
        print(f"{key:>24}: {value}")
    if peak.tflops:
        print(f"{'peak_tflops_per_device':>24}: {peak.tflops:.4g} ({peak.dtype}, {peak.source})")
    else:
        print(f"{'peak_tflops_per_device':>24}: none ({peak.note})")
    if peak.precision:
        print(f"{'peak_precision':>24}: {peak.precision}")
    print(f"{'peak_reference':>24}: {peak.reference}")
    if peak.hbm_gbytes_per_s:
        print(f"{'memory_gbytes_per_s':>24}: {peak.hbm_gbytes_per_s:.4g}")
    print(f"{'memory_bytes':>24}: {peak.memory_bytes if peak.memory_bytes else 'unknown (no allocator limit)'}")
    if peak.interconnect_gbytes_per_s:
        print(f"{'interconnect_gbytes_per_s':>24}: {peak.interconnect_gbytes_per_s:.4g} ({peak.interconnect})")
