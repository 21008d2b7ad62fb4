"""The plots: log-log small multiples of the fits (one PNG per family and quantity: points, fitted lines, bands,
ideal slopes), and a comparison's step-time ratios with their intervals against device count.

matplotlib is imported by the functions that draw, not with this module.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from jaxscale.families import family_frame, fit_points, prepare_rows
from jaxscale.powerlaw import PowerLawFit
from jaxscale.console import (by_names, cell_text, first_value, fit_sections, group_columns, group_label,
                              varying_key_columns)

LABELS = {
    "n_devices": "devices",
    "params": "parameters",
    "tokens_per_step": "tokens per step",
    "step_time_s": "step time (s)",
    "predicted_step_time_s": "predicted step time (s)",
    "tokens_per_s": "throughput (tokens/s)",
    "memory_per_device_bytes": "memory per device (bytes)",
    "state_bytes": "params + optimizer state per device (bytes)",
    "activation_bytes": "activations and temporaries per device (bytes)",
    "compiled_argument_bytes": "compiled argument bytes per device",
    "model_flops_per_step": "model FLOPs per step",
}
# Which group column names the series within a panel, by preference; the rest make the panels.
_SERIES_PREFERENCE = ("size_name", "n_devices", "d_model", "global_batch", "per_device_batch")


def axis_label(column: str) -> str:
    """A readable axis label with units for a column name."""
    if column in LABELS:
        return LABELS[column]
    for suffix, unit in (("_bytes", "bytes"), ("_s", "s")):
        if column.endswith(suffix):
            return f"{column[: -len(suffix)].replace('_', ' ')} ({unit})"
    return column.replace("_", " ")


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def plot_families(runs: pd.DataFrame | None, fits: pd.DataFrame, out_dir: Path | str,
                  usl: pd.DataFrame | None = None) -> list[Path]:
    """Log-log small multiples, one PNG per (family, y).

    A panel per value of the group columns other than the series column (model
    size for device-count families, device count for model-size families),
    panels sharing both axes. Within a panel each series has its own colour and
    marker: measured points, the fitted line with its confidence band, and the
    ideal slope (dashed) drawn through the series' first point. Legends mark
    inconclusive, not-applicable and curved fits. A USL fit of the same group is
    drawn dotted on throughput panels.

    Args:
      runs: the fitted rows (None: lines and bands only).
      fits: from ``powerlaw.fit_table`` or ``analyze.default_fits``.
      out_dir: folder for the PNG files (created).
      usl: from ``usl.usl_table`` (optional).

    Returns:
      The paths written, named ``<family>__<y>.png`` (``<x>__<y>.png`` without a family column).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    frames = {}
    for family, _, family_rows in fit_sections(fits):
        x = family_rows["x"].iloc[0]
        if runs is not None and family and x not in frames:
            prepared = prepare_rows(runs)
            frames[x] = family_frame(prepared, (x,))[0] if x in prepared.columns else prepared
        for y in dict.fromkeys(family_rows["y"]):
            rows = family_rows[family_rows["y"] == y]
            path = out_dir / _file_name(f"{family or rows['x'].iloc[0]}__{y}.png")
            if _plot_one(frames.get(x, runs), rows, y, family, path, usl, prepared=x in frames):
                written.append(path)
    return written


def _split_series(rows: pd.DataFrame) -> tuple[list[str], list[str], str]:
    """(panel columns, series columns, fixed text) for one plot."""
    varying, fixed = group_columns(rows)
    series = [c for c in _SERIES_PREFERENCE if c in varying][:1] or varying[-1:]
    panels = [c for c in varying if c not in series]
    # A column that follows the series and the other panel columns (the mesh shape follows the device count
    # and the strategy) would give every series a panel of its own.
    for column in list(panels):
        rest = [c for c in panels if c != column] + series
        if rest and rows.groupby(rest, dropna=False)[column].nunique(dropna=False).max() <= 1:
            panels.remove(column)
    return panels, series, fixed


def _usl_row(usl: pd.DataFrame | None, row) -> pd.Series | None:
    if usl is None or usl.empty or row["y"] not in set(usl["y"]):
        return None
    candidates = usl[(usl["y"] == row["y"]) & (usl["x"] == row["x"])]
    by = [c for c in by_names(candidates) if c in row.index]
    for _, cand in candidates.iterrows():
        if all((pd.isna(cand[c]) and pd.isna(row[c])) or cand[c] == row[c] for c in by):
            return cand if pd.notna(cand.get("sigma")) else None
    return None


def _legend_label(row, series: list[str]) -> str:
    label = group_label(row, series)
    if pd.notna(row["exponent"]):
        label += f": b = {row['exponent']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    elif cell_text(row["note"]):
        label += " (no fit)"
    flags = [f for f in (cell_text(row.get("assessment", "")), cell_text(row.get("curvature", "")))
             if f in ("inconclusive", "not applicable", "concave", "convex")]
    return label + (f" — {', '.join(flags).upper()}" if flags else "")


def _plot_one(runs: pd.DataFrame | None, rows: pd.DataFrame, y: str, family: str | None, path: Path,
              usl: pd.DataFrame | None = None, prepared: bool = False) -> bool:
    import matplotlib  # loaded for plots only: about a second of every command otherwise

    matplotlib.use("Agg")  # files only; never open a window, works without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    panels, series, fixed = _split_series(rows)
    x = rows["x"].iloc[0]
    pct = f"{100 * float(first_value(rows, 'confidence', 0.95)):g}%"
    panel_keys = list(dict.fromkeys(group_label(r, panels) for _, r in rows.iterrows())) if panels else ["all"]
    n_panels = len(panel_keys)
    ncols = min(4, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 0.6, 3.4 * nrows + 0.9), dpi=100, sharex=True,
                             sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    markers = "os^Dv<>ph*"
    drew = False
    seen = []  # the y values of points and lines: the axis limits, so wide bands cannot stretch the axes
    for p, panel in enumerate(panel_keys):
        ax = axes[p // ncols][p % ncols]
        in_panel = rows[[(group_label(r, panels) if panels else "all") == panel for _, r in rows.iterrows()]]
        for i, (_, row) in enumerate(in_panel.iterrows()):
            color, marker = colors[i % len(colors)], markers[i % len(markers)]
            points = fit_points(runs, row, prepared) if runs is not None else pd.DataFrame({"x": [], "y": []})
            label = _legend_label(row, series)
            if pd.notna(row["exponent"]):
                fit = PowerLawFit.from_row(row)
                grid = np.geomspace(fit.x_min, fit.x_max, 64)
                if fit.dof >= 2:  # with one degree of freedom the band covers the whole panel
                    low, high = fit.mean_band(grid)
                    ax.fill_between(grid, low, high, color=color, alpha=0.12, linewidth=0)
                style = "--" if cell_text(row.get("assessment", "")) in ("inconclusive", "not applicable") else "-"
                ax.plot(grid, fit.predict(grid), color=color, linewidth=1.5, linestyle=style)
                seen += [float(v) for v in fit.predict(grid[[0, -1]])]
                if pd.notna(row["ideal_exponent"]):
                    x0, y0 = ((points.sort_values("x").iloc[0]["x"], points.sort_values("x").iloc[0]["y"])
                              if len(points) else (fit.x_min, float(fit.predict(fit.x_min))))
                    ax.plot(grid, y0 * (grid / x0) ** row["ideal_exponent"], color=color, linewidth=1.0,
                            linestyle=(0, (2, 2)), alpha=0.8)
                drew = True
            cand = _usl_row(usl, row) if x == "n_devices" else None
            if cand is not None and len(points):
                grid = np.geomspace(points["x"].min(), points["x"].max(), 64)
                n = grid
                curve = cand["lambda_"] * n / (1 + cand["sigma"] * (n - 1) + cand["kappa"] * n * (n - 1))
                ax.plot(grid, curve, color=color, linewidth=1.0, linestyle=":")
            if len(points):
                seen += points["y"].tolist()
                ax.scatter(points["x"], points["y"], color=color, marker=marker, s=24, zorder=3, label=label,
                           edgecolors="black", linewidths=0.3)
                drew = True
            elif pd.notna(row["exponent"]):
                ax.plot([], [], color=color, marker=marker, label=label)
        ax.set_title(panel if panels else "", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower left", framealpha=0.8)
    for p in range(n_panels, nrows * ncols):
        axes[p // ncols][p % ncols].set_visible(False)
    if not drew:
        plt.close(fig)
        return False
    ax0 = axes[0][0]
    ax0.set_yscale("log")
    finite = [v for v in seen if np.isfinite(v) and v > 0]
    if finite:
        ax0.set_ylim(min(finite) / 2, max(finite) * 2)
    if x == "n_devices":
        ax0.set_xscale("log", base=2)
        ax0.xaxis.set_major_locator(LogLocator(base=2))
        ax0.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax0.set_xscale("log")
    # Minor ticks on shared log axes cost most of the drawing time and add nothing here.
    ax0.xaxis.set_minor_locator(NullLocator())
    ax0.yaxis.set_minor_locator(NullLocator())
    for ax in axes[-1]:
        ax.set_xlabel(axis_label(x))
    for row_axes in axes:
        row_axes[0].set_ylabel(axis_label(y))
    tail = ", dotted: USL" if usl is not None and y == "tokens_per_s" else ""
    fig.suptitle(f"{axis_label(y)} vs {axis_label(x)}" + (f"  [{family}]" if family else "") +
                 f"\npoints: measured; solid: fit y = a·x^b (dashed: inconclusive or not applicable), band: {pct} "
                 f"confidence (2+ dof); fine dashes: ideal slope through the first point{tail}", fontsize=8)
    fig.subplots_adjust(hspace=0.3, wspace=0.08, top=1 - 0.8 / fig.get_figheight(), bottom=0.9 / fig.get_figheight())
    if fixed:
        fig.text(0.01, 0.01, textwrap.fill(f"fixed: {fixed}", 180), fontsize=6.5, color="0.35", va="bottom")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_ratios(table: pd.DataFrame, path: Path) -> Path | None:
    """Ratios with their intervals against device count, a panel per strategy (log-2 x, log y).

    Returns the path written, or None when no point has a ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = table[pd.to_numeric(table["ratio"], errors="coerce").notna()].copy()
    if data.empty:
        return None
    threshold = table.attrs.get("threshold", 0.05)
    strategies = list(dict.fromkeys(data["strategy"]))
    extra = varying_key_columns(table)
    series_cols = [c for c in ("size_name", *extra) if c in data.columns]
    data["_series"] = data[series_cols].astype(str).agg(" ".join, axis=1) if series_cols else ""
    series = list(dict.fromkeys(data["_series"]))
    colors = {"slower": "#c0392b", "faster": "#1e8449", "same": "#7f8c8d", "noisy": "#e67e22"}
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, len(strategies), figsize=(3.6 * len(strategies) + 1.2, 3.8), sharey=True,
                             squeeze=False)
    ratios = pd.to_numeric(data["ratio"])
    low = pd.to_numeric(data["ratio_ci_low"], errors="coerce").fillna(ratios)
    high = pd.to_numeric(data["ratio_ci_high"], errors="coerce").fillna(ratios)
    span = max(abs(math.log(float(low.min()))), abs(math.log(float(high.max()))), math.log(1 + 2 * threshold))
    for ax, strategy in zip(axes[0], strategies):
        ax.axhspan(1 - threshold, 1 + threshold, color="#d5dbdb", alpha=0.6, lw=0)
        ax.axhline(1.0, color="black", lw=0.8)
        part = data[data["strategy"] == strategy]
        for j, name in enumerate(series):
            points = part[part["_series"] == name]
            offset = 2 ** ((j - (len(series) - 1) / 2) * 0.06)
            for _, r in points.iterrows():
                x = float(r["n_devices"]) * offset
                y = float(r["ratio"])
                lo = float(r["ratio_ci_low"]) if pd.notna(r["ratio_ci_low"]) else y
                hi = float(r["ratio_ci_high"]) if pd.notna(r["ratio_ci_high"]) else y
                color = colors.get(r["verdict"], "black")
                ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt=markers[j % len(markers)], color=color,
                            mfc=color if r["compared"] == "measured/measured" else "white", ms=6, capsize=3,
                            lw=1.2)
        ax.set_xscale("log", base=2)
        counts_ = sorted({int(v) for v in part["n_devices"]})
        ax.set_xticks(counts_, [str(c) for c in counts_])
        ax.minorticks_off()
        ax.set_title(strategy)
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
    axes[0][0].set_yscale("log")
    y_low, y_high = math.exp(-span * 1.15), math.exp(span * 1.15)
    axes[0][0].set_ylim(y_low, y_high)
    if y_high / y_low > 30:  # decades, and 2 and 5 between them
        candidates = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]
    else:
        fine = (0.95, 1.05) if y_high < 1.3 else ()  # next to 1 they only crowd a wide axis
        candidates = [0.1, 0.2, 0.25, 0.5, 0.67, 0.8, 0.9, *fine, 1.0, 1.1, 1.25, 1.5, 2, 4, 5, 10]
    ticks = [t for t in candidates if y_low <= t <= y_high]
    if len(ticks) > 9:  # keep 1 and thin out the rest
        ticks = sorted({1.0, *ticks[::2]})
    axes[0][0].yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axes[0][0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0][0].yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].set_ylabel("step time ratio new / base")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[j % len(markers)], ls="", color="black", label=name)
               for j, name in enumerate(series)]
    handles += [Line2D([], [], marker="s", ls="", color=c, label=v) for v, c in colors.items()]
    handles.append(Line2D([], [], lw=6, color="#d5dbdb", label=f"±{threshold:.0%}"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("jaxscale compare: step time new / base with intervals (hollow: a plan against a run, no "
                 "interval)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
