"""Fits and rows → summary.md, a terminal table, log-log plots; write_report puts them in a folder.

Only formatting lives here: every number comes from jaxscale.analyze.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window, works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from rich.table import Table  # noqa: E402

from jaxscale.analyze import PowerLawFit, fit_points  # noqa: E402

LABELS = {
    "n_devices": "devices",
    "params": "parameters",
    "step_time_s": "step time (s)",
    "tokens_per_s": "throughput (tokens/s)",
    "memory_per_device_bytes": "memory per device (bytes)",
    "compiled_argument_bytes": "compiled argument bytes per device",
    "model_flops_per_step": "model FLOPs per step",
}
# Size dimensions are summarized by size_name in labels when both are group columns.
_SIZE_DIMS = ("d_model", "n_layers", "n_heads", "d_ff", "vocab")


def axis_label(column: str) -> str:
    """A readable axis label with units for a column name."""
    if column in LABELS:
        return LABELS[column]
    for suffix, unit in (("_bytes", "bytes"), ("_s", "s")):
        if column.endswith(suffix):
            return f"{column[: -len(suffix)].replace('_', ' ')} ({unit})"
    return column.replace("_", " ")


def _num(value, spec: str = ".3g") -> str:
    """A number for a table cell: '' for missing, integers without a decimal point under spec 'g'."""
    if value is None or pd.isna(value):
        return ""
    if spec == "g" and float(value).is_integer():
        return str(int(value))
    return format(float(value), spec)


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _cell(value) -> str:
    return _num(value, "g") if isinstance(value, (int, float, np.number)) else str(value)


def _group_columns(rows: pd.DataFrame, by: list[str] | None = None) -> tuple[list[str], str]:
    """(group columns that tell these rows apart, 'col=value, ...' for those fixed across them).

    ``by`` defaults to the names in the rows' ``by`` column. Size dimensions are
    left to size_name when it is among the group columns.
    """
    if by is None:
        by = [c for text in rows.get("by", pd.Series(dtype=str)).dropna().unique() for c in str(text).split(",")]
    by = [c for c in dict.fromkeys(by) if c in rows.columns and not ("size_name" in by and c in _SIZE_DIMS)]
    varying = [c for c in by if rows[c].nunique(dropna=False) > 1]
    fixed = [f"{c}={_cell(rows[c].dropna().iloc[0])}" for c in by if c not in varying and rows[c].notna().any()]
    return varying, ", ".join(fixed)


def _group_label(row, columns: list[str]) -> str:
    parts = [_cell(row[c]) if c in ("size_name", "strategy", "batch_mode", "dtype") else f"{c}={_cell(row[c])}"
             for c in columns if not pd.isna(row[c])]
    return " ".join(parts) or "all"


def _exponent_text(row) -> tuple[str, str]:
    """('b ± half-width', '[low, high]'), or empty strings without a fit."""
    if pd.isna(row["exponent"]):
        return "", ""
    half = (row["ci_high"] - row["ci_low"]) / 2
    return f"{row['exponent']:+.3f} ± {half:.3f}", f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def _sections(fits: pd.DataFrame) -> list[tuple[str | None, str, pd.DataFrame]]:
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


def _section_notes(name: str, rows: pd.DataFrame, columns: list[str]) -> list[str]:
    """Markdown bullets: rows left out per group, and why a fit is missing."""
    notes = []
    labels = [_group_label(row, columns) for _, row in rows.iterrows()]
    for label in dict.fromkeys(labels):
        group = rows[[lab == label for lab in labels]]
        counts = group[group["n_dropped"] > 0]
        if len(counts) == len(group) and counts["n_dropped"].nunique() == 1:
            notes.append(f"- {name} / {label}: {int(counts['n_dropped'].iloc[0])} row(s) left out of every fit "
                         "(status not ok, or a missing or non-positive value)")
        elif len(counts):
            listed = ", ".join(f"{r['y']} {int(r['n_dropped'])}" for _, r in counts.iterrows())
            notes.append(f"- {name} / {label}: rows left out (status not ok, or a missing or non-positive value): "
                         f"{listed}")
        for _, r in group.iterrows():
            if _text(r["note"]):
                notes.append(f"- {name} / {label} / {r['y']}: {r['note']}")
    return notes


def fits_markdown(fits: pd.DataFrame, efficiency: pd.DataFrame | None = None, joint: pd.DataFrame | None = None,
                  expectations: pd.DataFrame | None = None) -> str:
    """summary.md: fit tables per family, scaling efficiency, joint fit, expectations, notes.

    Args:
      fits: from ``analyze.fit_table`` or ``analyze.default_fits``.
      efficiency: from ``analyze.scaling_efficiency``.
      joint: from ``analyze.joint_fit``.
      expectations: from ``analyze.check_expectation`` (several may be concatenated).

    Returns:
      Markdown text.
    """
    confidence = float(fits["confidence"].dropna().iloc[0]) if len(fits) and fits["confidence"].notna().any() else 0.95
    pct = f"{100 * confidence:g}%"
    out = ["# Scaling fits", "",
           f"Each row fits y = a·x^b by least squares on (log x, log y); the interval is the {pct} t interval of b. "
           "Regime compares b with the ideal exponent: *linear* when the interval contains the ideal, "
           "*sublinear* / *superlinear* when it lies below / above it. For costs (time, bytes) superlinear is worse "
           "than ideal; for throughput it is better (see *assessment*).", ""]
    if fits.empty:
        out += ["No fits: the rows have no usable x and y columns.", ""]
    notes = []
    for family, title, rows in _sections(fits):
        columns, fixed = _group_columns(rows)
        out += [f"## {title}", ""]
        if fixed:
            out += [f"Fixed across this family: {fixed}.", ""]
        has_assessment = "assessment" in rows.columns
        table = []
        for _, row in rows.iterrows():
            b, ci = _exponent_text(row)
            cells = [row["y"], _group_label(row, columns), b, ci, _num(row["ideal_exponent"], "g"), row["regime"]]
            cells += [row["assessment"]] if has_assessment else []
            table.append(cells + [_num(row["r2"], ".4f"), _num(row["n_points"], "g"), _num(row["n_dropped"], "g")])
        headers = ["y", "group", "exponent", f"{pct} CI", "ideal", "regime", *(["assessment"] if has_assessment
                                                                            else []), "r²", "n", "dropped"]
        out += [_md_table(headers, table), ""]
        notes += _section_notes(family or title, rows, columns)

    if efficiency is not None and len(efficiency):
        stats_columns = ("n_devices", "base_n_devices", "tokens_per_s", "tokens_per_s_per_device", "efficiency")
        shown = _group_columns(efficiency, [c for c in efficiency.columns if c not in stats_columns])[0]
        out += ["## Scaling efficiency", "",
                "Throughput per device relative to the group's smallest device count (1.0 = perfect scaling).", "",
                _md_table(["group", "devices", "base devices", "tokens/s", "tokens/s per device", "efficiency"],
                          [[_group_label(r, shown), _num(r["n_devices"], "g"), _num(r["base_n_devices"], "g"),
                            _num(r["tokens_per_s"]), _num(r["tokens_per_s_per_device"]), _num(r["efficiency"], ".3f")]
                           for _, r in efficiency.iterrows()]), ""]

    if joint is not None and len(joint):
        xs = [c[len("exponent_"):] for c in joint.columns if c.startswith("exponent_")]
        columns = _group_columns(joint)[0]
        table = []
        for _, r in joint.iterrows():
            cells = [r["y"], _group_label(r, columns)]
            for x in xs:
                b = r[f"exponent_{x}"]
                cells.append("" if pd.isna(b) else
                             f"{b:+.3f} [{r[f'ci_low_{x}']:+.3f}, {r[f'ci_high_{x}']:+.3f}]")
            table.append(cells + [_num(r["r2"], ".4f"), _num(r["n_points"], "g"), _text(r["note"])])
        out += ["## Joint fit", "",
                f"log y = log a + Σ b_x log x, least squares per group, {pct} t intervals.", "",
                _md_table(["y", "group", *[f"b_{x} {pct} CI" for x in xs], "r²", "n", "note"], table), ""]

    if expectations is not None and len(expectations):
        table = []
        claims = expectations[["y", "x", "claimed_exponent"]].astype(str).agg(" ".join, axis=1)
        for claim in dict.fromkeys(claims):
            rows = expectations[claims == claim]
            columns = _group_columns(rows)[0]
            for _, r in rows.iterrows():
                verdict = "no fit" if pd.isna(r["rejected"]) else "rejected" if bool(r["rejected"]) else "consistent"
                ci = "" if pd.isna(r["exponent"]) else (
                    f"{r['exponent']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
                table.append([f"{r['y']} ∝ {r['x']}^{_num(r['claimed_exponent'], 'g')}", _group_label(r, columns),
                              ci, _num(r["t_stat"], ".2f"), _num(r["p_value"], ".3g"), verdict, _text(r["note"])])
        out += ["## Expectations", "",
                "A claim is rejected when it lies outside the exponent's interval (p < 1 − confidence).", "",
                _md_table(["claim", "group", "exponent [CI]", "t", "p", "verdict", "note"], table), ""]

    if notes:
        out += ["## Notes", "", *notes, ""]
    return "\n".join(out)


def fits_console_table(fits: pd.DataFrame) -> Table:
    """The fits as a rich Table for the terminal (one row per fit, notes in the last column)."""
    table = Table(title="power-law fits  y = a·x^b")
    for header, justify in (("family", "left"), ("y", "left"), ("x", "left"), ("group", "left"),
                            ("exponent", "right"), ("CI", "right"), ("ideal", "right"), ("regime", "left"),
                            ("r²", "right"), ("n", "right"), ("note", "left")):
        table.add_column(header, justify=justify)
    for family, _, rows in _sections(fits):
        columns = _group_columns(rows)[0]
        for _, row in rows.iterrows():
            b, ci = _exponent_text(row)
            style = {"sublinear": "yellow", "superlinear": "cyan"}.get(row["regime"], "")
            table.add_row(family or "", row["y"], row["x"],
                          _group_label(row, columns), b, ci, _num(row["ideal_exponent"], "g"),
                          f"[{style}]{row['regime']}[/]" if style else row["regime"], _num(row["r2"], ".3f"),
                          _num(row["n_points"], "g"), _text(row["note"]))
    return table


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def plot_families(runs: pd.DataFrame | None, fits: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Log-log plots, one PNG per (family, y): measured points, fitted line, confidence band per group.

    Args:
      runs: the fitted rows (None: lines and bands only).
      fits: from ``analyze.fit_table`` or ``analyze.default_fits``.
      out_dir: folder for the PNG files (created).

    Returns:
      The paths written, named ``<family>__<y>.png`` (``<x>__<y>.png`` without a family column).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for family, _, family_rows in _sections(fits):
        for y in dict.fromkeys(family_rows["y"]):
            rows = family_rows[family_rows["y"] == y]
            path = out_dir / _file_name(f"{family or rows['x'].iloc[0]}__{y}.png")
            if _plot_one(runs, rows, y, family, path):
                written.append(path)
    return written


def _plot_one(runs: pd.DataFrame | None, rows: pd.DataFrame, y: str, family: str | None, path: Path) -> bool:
    columns, fixed = _group_columns(rows)
    x = rows["x"].iloc[0]
    confidence = rows["confidence"].dropna()
    pct = f"{100 * float(confidence.iloc[0]):g}%" if len(confidence) else ""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = plt.get_cmap("tab10").colors
    markers = "os^Dv<>ph*"
    drew = False
    for i, (_, row) in enumerate(rows.iterrows()):
        color, marker = colors[i % len(colors)], markers[(i // len(colors)) % len(markers)]
        label = _group_label(row, columns)
        points = fit_points(runs, row) if runs is not None else pd.DataFrame({"x": [], "y": []})
        if pd.notna(row["exponent"]):
            fit = PowerLawFit.from_row(row)
            grid = np.geomspace(fit.x_min, fit.x_max, 64)
            low, high = fit.mean_band(grid)
            ax.fill_between(grid, low, high, color=color, alpha=0.18, linewidth=0)
            ax.plot(grid, fit.predict(grid), color=color, linewidth=1.6)
            ideal = "" if pd.isna(row["ideal_exponent"]) else f", ideal {_num(row['ideal_exponent'], 'g')}"
            label += f": b = {fit.exponent:+.2f} [{fit.ci_low:+.2f}, {fit.ci_high:+.2f}]{ideal}"
            drew = True
        elif _text(row["note"]):
            label += " (no fit)"
        if len(points):
            ax.scatter(points["x"], points["y"], color=color, marker=marker, s=28, zorder=3, label=label)
            drew = True
        elif pd.notna(row["exponent"]):
            ax.plot([], [], color=color, label=label)
    if not drew:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2 if x == "n_devices" else 10)
    ax.set_yscale("log")
    if x == "n_devices":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(f"{axis_label(y)} vs {axis_label(x)}" + (f"  [{family}]" if family else "") +
                 f"\npoints: measured; lines: fitted y = a·x^b; bands: {pct} confidence of the fit", fontsize=10)
    if fixed:
        ax.text(0.01, 0.01, fixed, transform=ax.transAxes, fontsize=7, color="0.35", va="bottom")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(out_dir: Path | str, fits: pd.DataFrame, runs: pd.DataFrame | None = None,
                 efficiency: pd.DataFrame | None = None, joint: pd.DataFrame | None = None,
                 expectations: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write fits.csv, summary.md and plots/*.png (plus efficiency.csv, joint.csv, expectations.csv when given).

    Args:
      out_dir: the folder (created).
      fits: from ``analyze.fit_table`` or ``analyze.default_fits``.
      runs: the fitted rows, for the points on the plots.
      efficiency, joint, expectations: optional tables from jaxscale.analyze.

    Returns:
      Every written file by its path relative to out_dir, e.g. "fits.csv", "plots/devices__step_time_s.png".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"fits.csv": fits, "efficiency.csv": efficiency, "joint.csv": joint, "expectations.csv": expectations}
    for name, table in tables.items():
        if table is not None:
            table.to_csv(out_dir / name, index=False)
            written[name] = out_dir / name
    summary = out_dir / "summary.md"
    summary.write_text(fits_markdown(fits, efficiency=efficiency, joint=joint, expectations=expectations))
    written["summary.md"] = summary
    for path in plot_families(runs, fits, out_dir / "plots"):
        written[f"plots/{path.name}"] = path
    return written
