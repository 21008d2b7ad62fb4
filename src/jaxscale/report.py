"""The markdown reports: summary.md of the fits and compare.md of a comparison, written into a folder with their
tables and plots (write_report, write_compare).

Only formatting lives here: every number and every verdict comes from jaxscale.analyze or jaxscale.comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from jaxscale.analyze import Analysis
from jaxscale.families import SHARED_HOST_NOTE, succeeded, why_no_fits
from jaxscale.comparison import TIMING_VERDICTS, counts
from jaxscale.console import (cell_bytes, cell_format, cell_note, cell_number, cell_text, cell_value, exponent_text,
                              first_value, fit_sections, group_columns, group_label, method_line, point_label,
                              varying_key_columns)
from jaxscale.plots import plot_families, plot_ratios
from jaxscale.powerlaw import DEFAULT_TOLERANCE

VERDICTS = ("as ideal", "better than ideal", "worse than ideal", "above ideal", "below ideal", "inconclusive",
            "not applicable")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def _section_notes(name: str, rows: pd.DataFrame, columns: list[str]) -> list[str]:
    """Markdown bullets: rows left out per group, and why a fit is missing."""
    notes = []
    labels = [group_label(row, columns) for _, row in rows.iterrows()]
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
    return notes


def _shared_host_applies(*frames) -> bool:
    return any(frame is not None and "note" in frame.columns and frame["note"].astype(str).str.contains(
        SHARED_HOST_NOTE, regex=False).any() for frame in frames)


def _how_to_read(fits: pd.DataFrame, pct: str, tolerance: float) -> list[str]:
    return [
        f"**How to read the verdicts.** Each fit is y = a·x^b, least squares on (log x, log y), with the {pct} "
        f"t interval of b. *assessment* compares the whole interval with the ideal exponent ± {tolerance:g} "
        "(the tolerance): **as ideal** when the interval lies inside that band, **better than ideal** / **worse "
        "than ideal** when it lies wholly outside on one side, **inconclusive** otherwise (the note says why: too "
        "few points, or an interval wider than the band).",
        "",
        "**Convention.** *regime* uses the speed-up convention for every quantity: **superlinear** = better than "
        "ideal, **linear** = as ideal, **sublinear** = worse than ideal. Better means a larger exponent for "
        "throughput and a smaller one for costs (time, bytes), so the step time and the throughput of the same "
        "points always get the same word. A quantity with no better direction (FLOPs) reads *above* / *below "
        "ideal*, superlinear meaning an exponent above the ideal.",
        "",
        f"**Curvature.** A fit is *concave* or *convex* when a quadratic term in log-log is significant at {pct} "
        f"(t test, n − 3 dof) and changes the local exponent by more than {tolerance:g} across the measured range; "
        "its b is then an average slope.",
        "",
    ]


def _glance(fits: pd.DataFrame) -> list[str]:
    if "assessment" not in fits.columns or fits.empty:
        return []
    graded = fits[fits["assessment"].astype(str) != ""]
    if graded.empty:
        return []
    present = [v for v in VERDICTS if (graded["assessment"] == v).any()]
    table = []
    family = graded["family"] if "family" in graded.columns else graded["x"]
    for (fam, y), rows in graded.groupby([family, graded["y"]], sort=False):
        counts = rows["assessment"].value_counts()
        curved = int((rows.get("curvature", pd.Series(dtype=str)).astype(str) != "").sum())
        table.append([fam, y, *[str(int(counts.get(v, 0))) or "" for v in present], str(curved)])
    return ["## Verdicts at a glance", "", "Number of fits per verdict.", "",
            _md_table(["family", "y", *present, "curved"], table), ""]


def _fit_section(family: str | None, title: str, rows: pd.DataFrame, pct: str) -> tuple[list[str], list[str]]:
    columns, fixed = group_columns(rows)
    out = [f"## {title}", ""]
    if fixed:
        out += [f"Fixed across this family: {fixed}.", ""]
    has_verdict = "assessment" in rows.columns
    for y in dict.fromkeys(rows["y"]):
        sub = rows[rows["y"] == y]
        ideals = sorted({cell_format(v, "g") for v in sub["ideal_exponent"] if pd.notna(v)})
        direction = first_value(sub, "direction", "")
        about = ", ".join(filter(None, [f"ideal {' / '.join(ideals)}" if ideals else "no ideal",
                                        cell_text(direction)]))
        out += [f"### {y} ({about})", ""]
        table = []
        for _, row in sub.iterrows():
            b, ci = exponent_text(row)
            cells = [group_label(row, columns), b, ci, cell_format(row["ideal_exponent"], "g")]
            if has_verdict:
                cells += [cell_text(row["assessment"]), cell_text(row["regime"]), cell_text(row.get("curvature", ""))]
            table.append(cells + [cell_format(row["r2"], ".4f"), cell_format(row["n_points"], "g"),
                                  cell_note(row["note"])])
        headers = ["group", "exponent", f"{pct} CI", "ideal",
                   *(["assessment", "regime", "curvature"] if has_verdict else []), "r²", "n", "note"]
        out += [_md_table(headers, table), ""]
    return out, _section_notes(family or title, rows, columns)


def _key(row, columns) -> tuple:
    return tuple("" if pd.isna(row[c]) else cell_value(row[c]) for c in columns)


def _efficiency_section(efficiency: pd.DataFrame, fits: pd.DataFrame) -> list[str]:
    stats_columns = ("n_devices", "base_n_devices", "tokens_per_s", "tokens_per_s_per_device", "efficiency", "note")
    group_cols = [c for c in efficiency.columns if c not in stats_columns]
    shown = group_columns(efficiency, group_cols)[0]
    verdicts = {}
    if "family" in fits.columns:
        tps = fits[(fits["family"] == "devices") & (fits["y"] == "tokens_per_s")]
        common = [c for c in group_cols if c in tps.columns]
        verdicts = {_key(r, common): r for _, r in tps.iterrows()}
    else:
        common = []
    table = []
    labels = [group_label(r, shown) for _, r in efficiency.iterrows()]
    last = {label: i for i, label in enumerate(labels)}  # the verdict goes on each group's largest count
    for i, (_, r) in enumerate(efficiency.iterrows()):
        fit = verdicts.get(_key(r, common)) if common and last[labels[i]] == i else None
        verdict = "" if fit is None else cell_text(fit["assessment"])
        b = "" if fit is None or pd.isna(fit["exponent"]) else f"{fit['exponent']:+.3f}"
        table.append([labels[i], cell_format(r["n_devices"], "g"), cell_format(r["base_n_devices"], "g"),
                      cell_format(r["tokens_per_s"]), cell_format(r["tokens_per_s_per_device"]),
                      cell_format(r["efficiency"], ".3f"), b, verdict])
    bases = sorted({int(b) for b in efficiency["base_n_devices"].dropna()})
    out = ["## Scaling efficiency", "",
           "Throughput per device relative to the group's smallest device count (1.0 = perfect scaling); "
           "*base devices* is that count" + (f" ({', '.join(map(str, bases))} here: a mesh that needs a model axis "
                                             "starts above 1)" if len(bases) > 1 else "") +
           ". Beside it, the throughput exponent and its verdict (ideal 1).", ""]
    if _shared_host_applies(efficiency):
        out += [f"Efficiency below 1 is expected here: {SHARED_HOST_NOTE}.", ""]
    out += [_md_table(["group", "devices", "base devices", "tokens/s", "tokens/s per device", "efficiency",
                       "b (tokens/s)", "verdict"], table), ""]
    return out


def _usl_section(usl: pd.DataFrame, pct: str) -> list[str]:
    columns = group_columns(usl)[0]
    table = []
    for _, r in usl.iterrows():
        def ci(name):
            return "" if pd.isna(r.get(name)) else (f"{r[name]:.3g} [{r[name + '_ci_low']:.3g}, "
                                                    f"{r[name + '_ci_high']:.3g}]")
        kappa = "0 (fixed)" if r.get("model") == "amdahl" else ci("kappa")
        table.append([f"{r['y']}", group_label(r, columns), cell_text(r.get("model")), ci("sigma"), kappa,
                      cell_format(r.get("peak_n")), cell_format(r["n_points"], "g"), cell_note(r["note"])])
    return ["## Knees: Universal Scalability Law", "",
            "X(N) = λN / (1 + σ(N−1) + κN(N−1)) fitted to throughput against device count (least squares on "
            f"log X); σ is contention, κ coherency (crosstalk), each with its {pct} interval (Wald, n − 3 dof). "
            "Throughput peaks at N = √((1 − σ)/κ) when κ > 0. Where the counts cannot identify κ, Amdahl's law "
            "(κ = 0, n − 2 dof) is fitted instead (model `amdahl`). Families with fewer than 4 device counts are "
            "listed without a fit.", "",
            _md_table(["y", "group", "model", f"σ [{pct} CI]", f"κ [{pct} CI]", "peak N", "n", "note"], table), ""]


def _predictions_section(predictions: pd.DataFrame, pct: str) -> list[str]:
    columns = group_columns(predictions)[0]
    back = predictions[predictions["kind"] == "backtest"]
    out = ["## Predictions", "",
           f"Each fit extrapolated to 2× and 4× the largest device count, with {pct} prediction intervals. The "
           "backtest refits without the largest device count and predicts it: *error* = predicted / measured − 1, "
           "to show how far an extrapolation can be trusted.", ""]
    if len(back):
        inside = back["within_interval"].astype(bool)
        errors = back["error"].abs()
        out += [f"Backtests: {int(inside.sum())} of {len(back)} measurements inside their prediction interval; "
                f"median |error| {errors.median():.1%}, largest {errors.max():.1%}.", ""]

    def cell(r) -> str:
        return f"{cell_format(r['predicted'])} [{cell_format(r['pi_low'])}, {cell_format(r['pi_high'])}]"

    table = []
    keys = ["y", "method", *columns]
    for _, rows in predictions.groupby(keys, sort=False, dropna=False):
        first = rows.iloc[0]
        ext = rows[rows["kind"] == "extrapolate"].sort_values("x_value")
        cells = [first["y"], group_label(first, columns), first["method"]]
        cells += [f"{cell_format(r['x_value'], 'g')}: {cell(r)}" for _, r in ext.iterrows()][:2]
        cells += [""] * (5 - len(cells))
        bt = rows[rows["kind"] == "backtest"]
        if len(bt):
            r = bt.iloc[0]
            cells += [f"{cell_format(r['x_value'], 'g')}: {cell(r)}", cell_format(r["measured"]), f"{r['error']:+.1%}",
                      "yes" if bool(r["within_interval"]) else "no"]
        else:
            cells += ["", "", "", ""]
        table.append(cells + [cell_note(first["note"])])
    out += [_md_table(["y", "group", "method", "2× devices", "4× devices", "backtest (predicted)", "measured",
                       "error", "inside", "note"], table), ""]
    return out


def _plan_section(plan: pd.DataFrame) -> list[str]:
    out = ["## Plan against measurement", "",
           "Planned rows (`jaxscale plan`) joined with measured rows of the same grid point. step time ratio = "
           "predicted / measured; compiled ratio = planned / measured compiled total; memory ratio = planned "
           "compiled total / measured runtime peak. Geometric mean [min, max] per plan and strategy.", ""]

    def spread(values: pd.Series) -> str:
        v = values[(values > 0) & np.isfinite(values)]
        if v.empty:
            return ""
        return f"{math.exp(np.log(v).mean()):.3g} [{v.min():.3g}, {v.max():.3g}]"

    table = []
    for (source, strategy), rows in plan.groupby(["plan_source", "strategy"], sort=False):
        table.append([source, strategy, str(len(rows)), spread(rows["step_time_ratio"]),
                      spread(rows["compiled_ratio"]), spread(rows["memory_ratio"])])
    out += [_md_table(["plan", "strategy", "points", "step time ratio", "compiled ratio", "memory ratio"], table), ""]
    return out


def _joint_section(joint: pd.DataFrame, pct: str) -> list[str]:
    xs = [c[len("exponent_"):] for c in joint.columns if c.startswith("exponent_")]
    columns = group_columns(joint)[0]
    table = []
    for _, r in joint.iterrows():
        cells = [r["y"], group_label(r, columns)]
        for x in xs:
            b = r[f"exponent_{x}"]
            text = "" if pd.isna(b) else f"{b:+.3f} [{r[f'ci_low_{x}']:+.3f}, {r[f'ci_high_{x}']:+.3f}]"
            ideal = r.get(f"ideal_{x}")
            verdict = cell_text(r.get(f"assessment_{x}"))
            cells.append(", ".join(filter(None, [text, f"ideal {cell_format(ideal, 'g')}" if pd.notna(ideal) else "",
                                                 verdict])))
        table.append(cells + [cell_format(r["r2"], ".4f"), cell_format(r["n_points"], "g"), cell_note(r["note"])])
    return ["## Joint fit", "",
            f"log y = log a + Σ b_x log x, least squares per group, {pct} t intervals, graded as above.", "",
            _md_table(["y", "group", *[f"b_{x} {pct} CI" for x in xs], "r²", "n", "note"], table), ""]


def _expectations_section(expectations: pd.DataFrame) -> list[str]:
    table = []
    claims = expectations[["y", "x", "claimed_exponent"]].astype(str).agg(" ".join, axis=1)
    tolerance = first_value(expectations, "tolerance", DEFAULT_TOLERANCE)
    for claim in dict.fromkeys(claims):
        rows = expectations[claims == claim]
        columns = group_columns(rows)[0]
        for _, r in rows.iterrows():
            ci = "" if pd.isna(r["exponent"]) else f"{r['exponent']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            table.append([f"{r['y']} ∝ {r['x']}^{cell_format(r['claimed_exponent'], 'g')}", group_label(r, columns),
                          ci, cell_format(r["t_stat"], ".2f"), cell_format(r["p_value"], ".3g"),
                          cell_text(r.get("assessment")), cell_text(r["note"])])
    return ["## Expectations", "",
            f"Each claimed exponent is graded like an ideal, with tolerance ± {float(tolerance):g}: *as expected* "
            "when the interval lies inside claim ± tolerance, *above* / *below expected* when wholly outside, else "
            "*inconclusive*. t and p test the exact claim.", "",
            _md_table(["claim", "group", "exponent [CI]", "t", "p", "verdict", "note"], table), ""]


def fits_markdown(fits: pd.DataFrame, efficiency: pd.DataFrame | None = None, joint: pd.DataFrame | None = None,
                  expectations: pd.DataFrame | None = None, usl: pd.DataFrame | None = None,
                  predictions: pd.DataFrame | None = None, plan: pd.DataFrame | None = None,
                  runs: pd.DataFrame | None = None) -> str:
    """summary.md: how to read it, verdicts at a glance, fit tables per family, efficiency, knees,
    predictions, joint fit, plan against measurement, expectations, notes.

    Args:
      fits: from ``powerlaw.fit_table`` or ``analyze.default_fits``.
      efficiency: from ``analyze.scaling_efficiency``.
      joint: from ``analyze.default_joint_fit`` (or ``powerlaw.joint_fit``).
      expectations: from ``analyze.check_expectation`` (several may be concatenated).
      usl: from ``usl.usl_table`` / ``usl.default_usl``.
      predictions: from ``analyze.predict_table`` / ``analyze.default_predictions``.
      plan: from ``analyze.plan_vs_measured``.
      runs: the rows fitted, to say why there is no fit when ``fits`` is empty.

    Returns:
      Markdown text.
    """
    confidence = float(first_value(fits, "confidence", 0.95))
    tolerance = float(first_value(fits, "tolerance", DEFAULT_TOLERANCE))
    pct = f"{100 * confidence:g}%"
    out = ["# Scaling fits", "", *_how_to_read(fits, pct, tolerance)]
    if _shared_host_applies(fits, efficiency):
        out += ["> **Not graded here:** step time and throughput against device count. The rows ran on virtual "
                "CPU devices that share one host's cores, so adding devices cannot make a step faster; those "
                "fits read *not applicable*. Memory and model-size verdicts still hold.", ""]
    if fits.empty or (runs is not None and not succeeded(runs).any()):
        out += [f"No fits: {why_no_fits(runs) if runs is not None else 'the rows have no usable x and y columns'}.",
                ""]
    out += _glance(fits)
    notes = []
    for family, title, rows in fit_sections(fits):
        section, section_notes = _fit_section(family, title, rows, pct)
        out += section
        notes += section_notes
    if efficiency is not None and len(efficiency):
        out += _efficiency_section(efficiency, fits)
    if usl is not None and len(usl):
        out += _usl_section(usl, pct)
    if predictions is not None and len(predictions):
        out += _predictions_section(predictions, pct)
    if joint is not None and len(joint):
        out += _joint_section(joint, pct)
    if plan is not None and len(plan):
        out += _plan_section(plan)
    if expectations is not None and len(expectations):
        out += _expectations_section(expectations)
    if notes:
        out += ["## Notes", "", *notes, ""]
    return "\n".join(out)


def write_report(out_dir: Path | str, fits: pd.DataFrame, runs: pd.DataFrame | None = None,
                 efficiency: pd.DataFrame | None = None, joint: pd.DataFrame | None = None,
                 expectations: pd.DataFrame | None = None, usl: pd.DataFrame | None = None,
                 predictions: pd.DataFrame | None = None, plan: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write fits.csv, summary.md and plots/*.png, plus each optional table given.

    Args:
      out_dir: the folder (created).
      fits: from ``powerlaw.fit_table`` or ``analyze.default_fits``.
      runs: the fitted rows, for the points on the plots.
      efficiency, joint, expectations, usl, predictions, plan: optional tables
        from jaxscale.analyze, written as efficiency.csv, joint.csv,
        expectations.csv, usl.csv, predictions.csv, plan_vs_measured.csv.

    Returns:
      Every written file by its path relative to out_dir, e.g. "fits.csv", "plots/devices__step_time_s.png".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"fits.csv": fits, "efficiency.csv": efficiency, "joint.csv": joint, "expectations.csv": expectations,
              "usl.csv": usl, "predictions.csv": predictions, "plan_vs_measured.csv": plan}
    for name, table in tables.items():
        if table is not None:
            table.to_csv(out_dir / name, index=False)
            written[name] = out_dir / name
    summary = out_dir / "summary.md"
    summary.write_text(fits_markdown(fits, efficiency=efficiency, joint=joint, expectations=expectations, usl=usl,
                                     predictions=predictions, plan=plan, runs=runs))
    written["summary.md"] = summary
    for path in plot_families(runs, fits, out_dir / "plots", usl=usl):
        written[f"plots/{path.name}"] = path
    return written


# ------------------------------------------------------------ compare.md


def format_markdown(table: pd.DataFrame, diff: pd.DataFrame, base_sources=(), new_sources=()) -> str:
    """compare.md: the runtime diff, the verdict counts, the points sorted by effect, then the rest."""
    lines = ["# jaxscale compare", ""]
    if base_sources:
        lines.append(f"- base: {', '.join(map(str, base_sources))}")
    if new_sources:
        lines.append(f"- new: {', '.join(map(str, new_sources))}")
    lines += [f"- {method_line(table)}", ""]
    lines += ["## Runtime", ""]
    main = diff[diff["main"]] if len(diff) else diff
    if main.empty:
        lines += ["Versions, devices, processes, flags and peak agree.", ""]
    else:
        lines += ["| field | base | new |", "| --- | --- | --- |"]
        lines += [f"| {r.field} | {r.base} | {r.new} |" for r in main.itertuples()]
        lines.append("")
    if len(diff) > len(main):
        lines += ["Other runtime.json fields that differ: "
                  + ", ".join(f"`{f}`" for f in diff.loc[~diff["main"], "field"]) + ".", ""]
    tally = counts(table)
    lines += ["## Verdicts", "", " · ".join(f"{v}: {c}" for v, c in tally.items()), ""]
    left_out = table.attrs.get("left_out", ())
    if left_out:
        lines += [f"Not matched on {', '.join(left_out)}: one side's rows lack the column.", ""]
    extra = varying_key_columns(table)
    timed = table[table["verdict"].isin(TIMING_VERDICTS)]
    if len(timed):
        memory = pd.to_numeric(timed["memory_ratio"], errors="coerce").notna().any()  # a plan against a run
        lines += ["## Points, largest change first", "",
                  "| point | compared | base step s | new step s | ratio | interval | verdict | MFU Δ | compiled Δ | "
                  "runtime peak Δ | collective Δ |" + (" memory measured / planned |" if memory else ""),
                  "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if memory else "")]
        for _, r in timed.iterrows():
            interval = (f"{r['ratio_ci_low']:.3f}–{r['ratio_ci_high']:.3f} ({r['ci_level']:.1%})"
                        if pd.notna(r["ratio_ci_low"]) else "none")
            lines.append(f"| {point_label(r, extra)} | {r['compared']} | {cell_number(r['step_time_s_base'], '{:.4g}')} | "
                         f"{cell_number(r['step_time_s_new'], '{:.4g}')} | {cell_number(r['ratio'], '{:.3f}')} | {interval} | "
                         f"**{r['verdict']}** | {cell_number(r['mfu_delta'], '{:+.2%}')} | "
                         f"{cell_bytes(r['compiled_total_bytes_delta'], signed=True)} | {cell_bytes(r['peak_bytes_in_use_delta'], signed=True)} | "
                         f"{cell_bytes(r['collective_bytes_delta'], signed=True)} |" + (f" {cell_number(r['memory_ratio'], '{:.3f}')} |"
                                                                       if memory else ""))
        lines.append("")
        notes = sorted({str(n) for n in timed["note"].dropna() if str(n)})
        if notes:
            lines += ["Notes: " + " ".join(f"{n}." for n in notes), ""]
    rest = table[~table["verdict"].isin(TIMING_VERDICTS)]
    if len(rest):
        lines += ["## Failed and one-sided points", "", "| point | verdict | note |", "| --- | --- | --- |"]
        lines += [f"| {point_label(r, extra)} | {r['verdict']} | {r['note']} |" for _, r in rest.iterrows()]
        lines.append("")
    return "\n".join(lines)


def write_compare(out_dir: Path | str, table: pd.DataFrame, diff: pd.DataFrame, base_sources=(),
                  new_sources=()) -> dict[str, Path]:
    """Write compare.csv, compare.md and compare.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "compare.csv", "md": out_dir / "compare.md"}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(format_markdown(table, diff, base_sources, new_sources))
    plot = plot_ratios(table, out_dir / "compare.png")
    if plot is not None:
        paths["plot"] = plot
    return paths


def write_analysis(out_dir: Path | str, analysis: Analysis, runs: pd.DataFrame | None = None) -> dict[str, Path]:
    """write_report of an analyze.Analysis: fits.csv, summary.md, plots/*.png and each table it holds."""
    return write_report(out_dir, analysis.fits, runs=runs, efficiency=analysis.efficiency, joint=analysis.joint,
                        expectations=analysis.expectations, usl=analysis.usl, predictions=analysis.predictions,
                        plan=analysis.plan)
