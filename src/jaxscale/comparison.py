"""Two sets of rows → matched points, step-time ratios with intervals, verdicts.

A point is matched on records.MATCH_COLUMNS: its point key (the grid key and
the run settings that decide what was compiled: dtype, attention, scan_layers)
and its labels (size name, batch mode). Each side is one run or several runs of the same profile.

The ratio new/base of a point's step times and its interval come from
jaxscale.intervals. Per-step samples show only the noise within a run, not
the drift between two runs (other load on the host, clocks, placement), which
on a shared machine is larger. So where each side holds at least three runs of
the point, the interval is Welch's t over the logs of the runs' median step
times (interval_over = runs); otherwise it is the Hodges–Lehmann ratio with
Moses's interval over the steps, widened by the drift estimated from all
points of the comparison (run_drift_sd, an empirical null). Intervals are
simultaneous over the points of a comparison (Bonferroni), so an unchanged
grid of any size has at most a 1 − confidence chance of a point called slower
or faster.

Verdicts, with threshold t:
  slower   the interval lies above 1 and the ratio exceeds 1 + t
  faster   the interval lies below 1 and the ratio is under 1 − t
  same     the interval lies inside [1 − t, 1 + t]
  noisy    none of these: the interval is too wide to tell
For a point measured on one side and planned (row_source ``planned:...``) on
the other, predicted step time is compared with measured step time and
compiled memory with runtime peak memory; a plan has no samples, so there is
no interval and the verdict applies the threshold to the ratio alone.
Points whose rows failed are ``failed`` (new side), ``fixed`` (base side) or
``both_failed``; points on one side only are ``base_only`` or ``new_only``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from jaxscale.config import BadInput
from jaxscale.intervals import (MIN_POINTS_FOR_DRIFT, MIN_SAMPLES, RunDrift, estimate_run_drift, ratio_interval,
                                run_ratio_interval)
from jaxscale.records import (COLLECTIVE_COLUMNS, MATCH_COLUMNS, SUCCESS_STATUSES, drop_duplicates, file_digest,
                              read_table, run_labels, table_path)

# The point key: the grid key and the other columns that change the compiled program.
# Key columns older reports may lack, and the value they then had.
KEY_DEFAULTS = {"xla_flags": "", "remat": "none"}
# runtime.json fields (and runs.csv columns) worth a line in the diff, in this order.
RUNTIME_FIELDS = ("jax_version", "jaxlib_version", "flax_version", "libtpu_version", "cuda_version",
                  "cudnn_version", "backend", "device_kind", "topology", "process_count", "global_devices",
                  "local_devices", "xla_flags", "host", "peak.tflops", "peak.source")
# runtime.json fields that differ between any two runs and say nothing about the runtime.
RUNTIME_IGNORED = ("process_index",)
TIMING_VERDICTS = ("faster", "slower", "same", "noisy")
GATE_VERDICTS = ("slower", "failed")  # a CI gate fails on these


class CompareError(BadInput):
    """Input that cannot be compared; the message is one line naming the file or column."""


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a comparison: the rows of one or more reports and their runtimes.

    Attributes:
      runs: the rows of each runs.csv given, one DataFrame per report.
      runtimes: one dict per report: its runtime.json, or the runtime columns of
        its rows where no runtime.json lies beside the CSV.
      sources: the runs.csv paths read.
      digests: a hash of each file's bytes (one file under two names is one file).
    """

    runs: tuple[pd.DataFrame, ...]
    runtimes: tuple[dict, ...]
    sources: tuple[str, ...]
    digests: tuple[str, ...] = ()


# ---------------------------------------------------------------- reading


def read_side(paths) -> Side:
    """Read report folders or runs.csv files as one side of a comparison.

    Raises:
      CompareError: a path that does not exist, a folder without runs.csv, an
        empty or unreadable CSV, or one without jaxscale's step-time columns.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames, runtimes, sources, digests = [], [], [], []
    for name in paths:
        try:
            csv_path = table_path(name)
            frame = read_table(csv_path, csv_path)
        except ValueError as e:
            raise CompareError(str(e)) from None
        missing = [c for c in ("strategy", "n_devices") if c not in frame.columns]
        if missing or not ({"step_time_s", "predicted_step_time_s"} & set(frame.columns)):
            need = missing or ["step_time_s or predicted_step_time_s"]
            raise CompareError(f"{csv_path}: no column {', '.join(need)}, so these are not jaxscale rows")
        digest = file_digest(csv_path)
        if digest in digests:
            warnings.warn(f"{csv_path} holds the same rows as {sources[digests.index(digest)]}; read once")
            continue
        frames.append(frame)
        runtimes.append(_runtime_of(csv_path, frame))
        sources.append(str(csv_path))
        digests.append(digest)
    if not frames:
        raise CompareError("nothing to compare: give at least one report folder or runs.csv per side")
    return Side(runs=tuple(frames), runtimes=tuple(runtimes), sources=tuple(sources), digests=tuple(digests))


def shared_runs(base: Side, new: Side) -> list[str]:
    """The runs both sides hold: run ids found on both, or files with the same bytes ('' when none)."""
    ids = [set(run_labels(r)) - {""} for side in (base, new) for r in side.runs]
    half = len(base.runs)
    common = set().union(*ids[:half]) & set().union(*ids[half:])
    files = [f"{b} = {n}" for b, db in zip(base.sources, base.digests) for n, dn in zip(new.sources, new.digests)
             if db == dn]
    return sorted(common) + files


def _runtime_of(csv_path: Path, rows: pd.DataFrame) -> dict:
    """runtime.json beside the CSV, else what the rows' runtime columns say."""
    path = csv_path.parent / "runtime.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except ValueError:
            warnings.warn(f"{path}: not valid JSON; the runtime is read from the rows instead")
    out = {}
    for column, field in (("jax_version", "jax_version"), ("jaxlib_version", "jaxlib_version"),
                          ("flax_version", "flax_version"), ("libtpu_version", "libtpu_version"),
                          ("backend", "backend"), ("device_kind", "device_kind"), ("n_processes", "process_count"),
                          ("xla_flags", "xla_flags")):
        if column in rows.columns:
            values = sorted({str(v) for v in rows[column].dropna()})
            if values:
                out[field] = ", ".join(values)
    return out


# ---------------------------------------------------------------- verdicts


def verdict(ratio: float, ci_low: float, ci_high: float, threshold: float) -> str:
    """faster / slower / same / noisy for a ratio new/base and its interval (see the module docstring)."""
    if not np.isfinite(ratio):
        return "noisy"
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "noisy"
    if ci_low > 1.0 and ratio > 1.0 + threshold:
        return "slower"
    if ci_high < 1.0 and ratio < 1.0 - threshold:
        return "faster"
    if ci_low >= 1.0 - threshold and ci_high <= 1.0 + threshold:
        return "same"
    return "noisy"


def threshold_verdict(ratio: float, threshold: float) -> str:
    """The verdict of a ratio without an interval (a plan against a run)."""
    if not np.isfinite(ratio):
        return "noisy"
    if ratio > 1.0 + threshold:
        return "slower"
    if ratio < 1.0 - threshold:
        return "faster"
    return "same"


# ---------------------------------------------------------------- matching


def _key_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if value != value:
            return ""
        if float(value).is_integer():
            return str(int(value))
    return str(value)


# The columns a comparison reads, beyond the key.
VALUE_COLUMNS = ("_run", "row_source", "status", "error", "step_time_samples_s", "step_time_s",
                 "predicted_step_time_s", "mfu", "predicted_mfu", "compiled_total_bytes", "peak_bytes_in_use",
                 *COLLECTIVE_COLUMNS)


def _normalize(rows: pd.DataFrame, key: tuple[str, ...]) -> pd.DataFrame:
    """The key columns as text (defaults filled in) and the value columns, nothing else."""
    rows = rows[[c for c in dict.fromkeys((*key, *VALUE_COLUMNS)) if c in rows.columns]].copy()
    for column in ("step_time_s", "predicted_step_time_s", "mfu", "predicted_mfu", "compiled_total_bytes",
                   "peak_bytes_in_use", *COLLECTIVE_COLUMNS):
        if column in rows.columns:
            rows[column] = pd.to_numeric(rows[column], errors="coerce").astype(float)
    if "remat" in rows.columns:  # schema 1 kept remat as a boolean
        rows["remat"] = rows["remat"].map(lambda v: {"true": "full", "false": "none", "True": "full",
                                                     "False": "none"}.get(_key_text(v), _key_text(v)))
    for column in key:
        if column not in rows.columns:
            rows[column] = KEY_DEFAULTS[column]
        rows[column] = rows[column].map(_key_text)
    if "row_source" not in rows.columns:
        rows["row_source"] = "measured"
    rows["row_source"] = rows["row_source"].map(_key_text).replace("", "measured")
    if "status" not in rows.columns:
        rows["status"] = "ok"
    rows["status"] = rows["status"].map(_key_text)
    return rows


def match_columns(base: pd.DataFrame, new: pd.DataFrame) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the key columns both sides can be matched on, the key columns left out because one side lacks them)."""
    used, left_out = [], []
    for column in MATCH_COLUMNS:
        in_base, in_new = column in base.columns, column in new.columns
        if (in_base and in_new) or ((in_base or in_new) and column in KEY_DEFAULTS):
            used.append(column)
        elif in_base or in_new:
            left_out.append(column)
    return tuple(used), tuple(left_out)


def _kind(row_source: str) -> str:
    return "planned" if row_source.startswith("planned") else "measured"


def _row_samples(text, median) -> list[float]:
    """One row's per-step samples (seconds); a row without them gives its median step time."""
    parts = [] if text is None or (isinstance(text, float) and text != text) else str(text).split(";")
    try:
        values = [float(p) for p in parts if p.strip()]
    except ValueError:
        raise CompareError(f"step_time_samples_s {str(text)[:60]!r}: expected seconds joined by ';'") from None
    if not values:
        try:
            values = [float(median)]
        except (TypeError, ValueError):
            values = []
    return [v for v in values if math.isfinite(v) and v > 0]


def _samples_by_run(rows: pd.DataFrame) -> dict[int, np.ndarray]:
    """The per-step samples of a point's rows, pooled per run."""
    texts = rows["step_time_samples_s"] if "step_time_samples_s" in rows.columns else [None] * len(rows)
    medians = rows["step_time_s"] if "step_time_s" in rows.columns else [None] * len(rows)
    out: dict[int, list[float]] = {}
    for run, text, median in zip(rows["_run"], texts, medians):
        out.setdefault(int(run), []).extend(_row_samples(text, median))
    return {run: np.asarray(v, dtype=float) for run, v in out.items()}


def _mean(rows: pd.DataFrame, column: str) -> float:
    if column not in rows.columns:
        return math.nan
    values = rows[column].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _collective_bytes(rows: pd.DataFrame) -> float:
    """Mean over rows of the sum of the collective byte columns (a row with none of them is left out)."""
    present = [c for c in COLLECTIVE_COLUMNS if c in rows.columns]
    if not present:
        return math.nan
    values = rows[present].to_numpy(dtype=float)
    filled = np.isfinite(values).any(axis=1)
    return float(np.nansum(values[filled], axis=1).mean()) if filled.any() else math.nan


def _side_summary(rows: pd.DataFrame) -> dict:
    """One side of one point: its usable rows (measured before planned) summarized."""
    usable = rows[rows["status"].isin(SUCCESS_STATUSES)]
    if usable.empty:
        statuses = sorted(set(rows["status"]))
        errors = [str(e) for e in rows.get("error", pd.Series(dtype=object)).dropna() if str(e)]
        return {"status": ";".join(statuses), "kind": _kind(str(rows["row_source"].iloc[0])), "ok": False,
                "error": errors[0][:200] if errors else "", "n_rows": len(rows)}
    measured = usable[usable["row_source"].map(_kind) == "measured"]
    chosen = measured if len(measured) else usable
    kind = "measured" if len(measured) else "planned"
    out = {"status": ";".join(sorted(set(chosen["status"]))), "kind": kind, "ok": True, "error": "",
           "n_rows": len(chosen), "row_source": ";".join(sorted(set(chosen["row_source"])))}
    if kind == "measured":
        per_run = _samples_by_run(chosen)
        samples = np.concatenate(list(per_run.values())) if per_run else np.array([])
        out["samples"] = samples
        out["step_time_s"] = float(np.median(samples)) if len(samples) else math.nan
        out["run_medians"] = np.array([np.median(r) for r in per_run.values() if len(r)])
    else:
        out["samples"] = out["run_medians"] = np.array([])
        out["step_time_s"] = _mean(chosen, "predicted_step_time_s")
    out["mfu"] = _mean(chosen, "mfu" if kind == "measured" else "predicted_mfu")
    out["compiled_total_bytes"] = _mean(chosen, "compiled_total_bytes")
    out["peak_bytes_in_use"] = _mean(chosen, "peak_bytes_in_use")
    out["collective_bytes"] = _collective_bytes(chosen)
    return out


def compare(base_rows, new_rows, threshold: float = 0.05, confidence: float = 0.95,
            familywise: bool = True) -> pd.DataFrame:
    """Match two sets of runs.csv rows point by point and give each point a verdict.

    Args:
      base_rows, new_rows: rows as read by ``jaxscale.read_rows``: one
        DataFrame (one run), or a list of them (repeated runs of the same
        profile). Where both sides hold at least MIN_SAMPLES runs of a point,
        the interval is taken over the runs' median step times, so that it
        covers the drift between runs; otherwise over the per-step samples,
        pooled across a side's runs (column ``interval_over``).
      threshold: the relative change in step time below which a point is the
        same (0.05: 5%).
      confidence: the coverage of the step-time ratios' intervals; with
        ``familywise`` (the default) all m intervals together (each at
        1 − (1 − confidence)/m, Bonferroni), else each one.

    Returns:
      One row per point of either side: the key columns, ``compared``
      (``measured/measured``, ``planned/measured``, ...), step times per side,
      ``ratio``, ``ratio_ci_low``, ``ratio_ci_high``, ``ci_level``, ``verdict``,
      the MFU, compiled memory, runtime peak memory and collective bytes of
      each side and their change (``*_delta``, new − base), ``memory_ratio``
      for a plan against a run, and a ``note``. Sorted by effect (the largest
      change in step time first), then failures and one-sided points.

    Raises:
      CompareError: a threshold or confidence out of range, or rows without
        the columns a point is matched on.
    """
    if not 0 <= threshold < 1:
        raise CompareError(f"threshold {threshold}: expected a fraction in [0, 1), e.g. 0.05 for 5%")
    if not 0 < confidence < 1:
        raise CompareError(f"confidence {confidence}: expected a number between 0 and 1, e.g. 0.95")
    sides = []
    for name, runs in (("base", base_rows), ("new", new_rows)):
        runs = [runs] if isinstance(runs, pd.DataFrame) else list(runs)
        if not runs:
            raise CompareError(f"no {name} rows to compare")
        for rows in runs:
            lacking = [c for c in ("strategy", "n_devices") if c not in rows.columns]
            if lacking:
                raise CompareError(f"the {name} rows have no column {', '.join(lacking)}, so they are not "
                                   "jaxscale rows")
        side = pd.concat([r.assign(_file=i) for i, r in enumerate(runs)], ignore_index=True)
        # A run is a run id (rows without one: the rows of one file), so two runs in one file are two runs and
        # one run given twice is one.
        labels = run_labels(side, "").where(run_labels(side, "") != "", "file " + side["_file"].astype(str))
        side, repeats = drop_duplicates(side.drop(columns="_file"), labels)
        if repeats:
            warnings.warn(f"{name}: dropped {repeats} duplicate row(s), the same run and grid point recorded twice "
                          "(kept the first)")
        labels = labels.loc[side.index]
        sides.append(side.assign(_run=pd.factorize(labels)[0]).reset_index(drop=True))
    key, left_out = match_columns(*sides)
    base = _normalize(sides[0], key)
    new = _normalize(sides[1], key)
    base_groups = {k: g for k, g in base.groupby(list(key), sort=False)}
    new_groups = {k: g for k, g in new.groupby(list(key), sort=False)}
    pairs = []
    for point in list(base_groups) + [k for k in new_groups if k not in base_groups]:
        b = _side_summary(base_groups[point]) if point in base_groups else None
        n = _side_summary(new_groups[point]) if point in new_groups else None
        pairs.append((point, b, n))
    # Bonferroni: each of the m intervals at 1 − (1 − confidence)/m, so that an unchanged grid has at most a
    # 1 − confidence chance of any point called slower or faster.
    m = sum(1 for _, b, n in pairs if b and n and b["ok"] and n["ok"] and b["kind"] == n["kind"] == "measured"
            and len(b["samples"]) and len(n["samples"])) if familywise else 1
    level = 1.0 - (1.0 - confidence) / max(m, 1)
    records = [{**dict(zip(key, point)), **_compare_point(b, n, threshold, level)} for point, b, n in pairs]
    table = pd.DataFrame.from_records(records)
    for column in OUTPUT_COLUMNS:
        if column not in table.columns:
            table[column] = math.nan
    table = table[[*key, *OUTPUT_COLUMNS]]
    for column in key:  # integer key columns back to integers (they were matched as text)
        numbers = pd.to_numeric(table[column], errors="coerce")
        if numbers.notna().all() and (numbers == numbers.round()).all():
            table[column] = numbers.astype(int)
    drift = _widen_for_run_drift(table, threshold, level)
    effect = np.abs(np.log(pd.to_numeric(table["ratio"], errors="coerce")))
    order = table["verdict"].map(VERDICT_ORDER).fillna(len(VERDICT_ORDER))
    table = (table.assign(_order=order, _effect=effect.fillna(-1.0))
             .sort_values(["_order", "_effect"], ascending=[True, False], kind="stable")
             .drop(columns=["_order", "_effect"]).reset_index(drop=True))
    table.attrs.update(key=key, left_out=left_out, threshold=threshold, confidence=confidence, run_drift=drift,
                       point_confidence=level, familywise=familywise)
    return table


def _widen_for_run_drift(table: pd.DataFrame, threshold: float, confidence: float) -> RunDrift | None:
    """Widen intervals taken over steps by the drift between runs, in place.

    Each bound moves away from the estimate by the root sum of squares of its
    within-run distance and t·sd of the drift, in log space, t the Student
    quantile of the confidence level with the drift estimate's degrees of
    freedom (the drift is estimated, not known). Returns the drift, or None
    when no interval is over steps.
    """
    from scipy.stats import norm, t as student

    steps = (table["interval_over"] == "steps") & table["ratio_ci_low"].notna()
    if not steps.any():
        return None
    q = 0.5 + confidence / 2
    d = np.log(table.loc[steps, "ratio"].astype(float))
    lo = np.log(table.loc[steps, "ratio_ci_low"].astype(float))
    hi = np.log(table.loc[steps, "ratio_ci_high"].astype(float))
    table.loc[steps, "within_run_ci_low"] = np.exp(lo)
    table.loc[steps, "within_run_ci_high"] = np.exp(hi)
    drift = estimate_run_drift(d, (hi - lo) / (2 * float(norm.ppf(q))))
    table.loc[steps, "run_drift_sd"] = drift.sd
    if not np.isfinite(drift.sd):
        table.loc[steps, "note"] = table.loc[steps, "note"].map(
            lambda n: "; ".join(filter(None, [n, f"fewer than {MIN_POINTS_FOR_DRIFT} points: the drift between "
                                                 "runs is not estimated, the interval covers steps only"])))
        return drift
    spread = float(student.ppf(q, drift.df)) * drift.sd
    table.loc[steps, "ratio_ci_low"] = np.exp(d - np.hypot(d - lo, spread))
    table.loc[steps, "ratio_ci_high"] = np.exp(d + np.hypot(hi - d, spread))
    table.loc[steps, "verdict"] = [verdict(r, a, b, threshold) for r, a, b in
                                   table.loc[steps, ["ratio", "ratio_ci_low", "ratio_ci_high"]].itertuples(index=False)]
    return drift


OUTPUT_COLUMNS = (
    "compared", "row_source_base", "row_source_new", "status_base", "status_new", "n_runs_base", "n_runs_new",
    "n_samples_base", "n_samples_new", "step_time_s_base", "step_time_s_new", "ratio", "ratio_ci_low",
    "ratio_ci_high", "ci_level", "interval_over", "within_run_ci_low", "within_run_ci_high", "run_drift_sd",
    "verdict", "mfu_base", "mfu_new", "mfu_delta", "compiled_total_bytes_base",
    "compiled_total_bytes_new", "compiled_total_bytes_delta", "peak_bytes_in_use_base", "peak_bytes_in_use_new",
    "peak_bytes_in_use_delta", "collective_bytes_base", "collective_bytes_new", "collective_bytes_delta",
    "memory_ratio", "note",
)
# Sort order: timing verdicts by effect together, then failures, then one-sided points.
VERDICT_ORDER = {"slower": 0, "faster": 0, "noisy": 0, "same": 0, "failed": 1, "fixed": 2, "both_failed": 3,
                 "base_only": 4, "new_only": 5}


def _compare_point(b: dict | None, n: dict | None, threshold: float, confidence: float) -> dict:
    if b is None or n is None:
        side = n if b is None else b
        return {"verdict": "new_only" if b is None else "base_only",
                "status_base": b["status"] if b else "", "status_new": n["status"] if n else "",
                "note": "no row for this point on the " + ("base" if b is None else "new") + " side"
                        + ("" if side["ok"] else f"; {side['status']}: {side['error']}")}
    out = {"status_base": b["status"], "status_new": n["status"], "compared": f"{b['kind']}/{n['kind']}"}
    if not (b["ok"] and n["ok"]):
        if b["ok"]:
            out.update(verdict="failed", note=f"new {n['status']}: {n['error']}")
        elif n["ok"]:
            out.update(verdict="fixed", note=f"base {b['status']}: {b['error']}")
        else:
            out.update(verdict="both_failed", note=f"base {b['status']}, new {n['status']}: {n['error']}")
        return out
    out.update(row_source_base=b["row_source"], row_source_new=n["row_source"],
               step_time_s_base=b["step_time_s"], step_time_s_new=n["step_time_s"],
               n_samples_base=len(b["samples"]), n_samples_new=len(n["samples"]),
               n_runs_base=len(b["run_medians"]), n_runs_new=len(n["run_medians"]))
    for column in ("mfu", "compiled_total_bytes", "peak_bytes_in_use", "collective_bytes"):
        out[f"{column}_base"], out[f"{column}_new"] = b[column], n[column]
        out[f"{column}_delta"] = n[column] - b[column]
    notes = []
    if b["kind"] == n["kind"] == "measured":
        if len(b["samples"]) and len(n["samples"]):
            over_runs = min(len(b["run_medians"]), len(n["run_medians"])) >= MIN_SAMPLES
            unit = "runs" if over_runs else "steps"
            x, y = (b["run_medians"], n["run_medians"]) if over_runs else (b["samples"], n["samples"])
            est = (run_ratio_interval if over_runs else ratio_interval)(x, y, confidence)
            out.update(ratio=est.ratio, ratio_ci_low=est.ci_low, ratio_ci_high=est.ci_high, ci_level=est.level,
                       interval_over=unit)
            out["verdict"] = verdict(est.ratio, est.ci_low, est.ci_high, threshold)
            if not np.isfinite(est.ci_low):
                notes.append(f"fewer than {MIN_SAMPLES} step samples on a side: no interval")
            elif est.level < confidence - 1e-9:
                notes.append(f"{len(x)} and {len(y)} {unit} reach only a {est.level:.1%} interval")
        else:
            out["verdict"] = "noisy"
            notes.append("no step times on a side")
    else:
        ratio = n["step_time_s"] / b["step_time_s"] if b["step_time_s"] else math.nan
        out.update(ratio=ratio, verdict=threshold_verdict(ratio, threshold))
        if b["kind"] != n["kind"]:
            plan, run = (b, n) if b["kind"] == "planned" else (n, b)
            out["memory_ratio"] = (run["peak_bytes_in_use"] / plan["compiled_total_bytes"]
                                   if plan["compiled_total_bytes"] else math.nan)
            notes.append("predicted against measured step time, and runtime peak against compiled memory "
                         "(memory_ratio = measured / planned); a plan has no samples, so no interval")
            if not np.isfinite(out["memory_ratio"]):
                notes.append("no runtime peak memory measured on this backend")
        else:
            notes.append("predicted step times of two plans; no interval")
    out["note"] = "; ".join(notes)
    return out


def counts(table: pd.DataFrame) -> dict[str, int]:
    """How many points got each verdict (timing verdicts always listed)."""
    found = table["verdict"].value_counts().to_dict()
    out = {v: int(found.get(v, 0)) for v in TIMING_VERDICTS}
    out.update({v: int(c) for v, c in found.items() if v not in out})
    return out


def gate_fails(table: pd.DataFrame) -> bool:
    """True when some point is slower beyond the threshold, or ran before and fails now."""
    return bool(table["verdict"].isin(GATE_VERDICTS).any())


def matched(table: pd.DataFrame) -> int:
    return int((~table["verdict"].isin(("base_only", "new_only"))).sum())


# ---------------------------------------------------------------- runtimes


def runtime_diff(base_runtimes, new_runtimes) -> pd.DataFrame:
    """The runtime fields that differ between the sides: columns field, base, new, main.

    The fields of RUNTIME_FIELDS first (``main`` true: versions, devices,
    processes, flags, the peak), then any other scalar field of runtime.json
    that differs, nested ones named with dots (``peak.hbm_gbytes_per_s``).
    With several reports on a side, its distinct values are joined by ", ".
    """
    def values(runtimes) -> dict[str, str]:
        seen: dict[str, list[str]] = {}
        for runtime in runtimes:
            for field, value in _flatten(runtime).items():
                if field == "n_processes":
                    field = "process_count"
                text = _key_text(value)
                seen.setdefault(field, [])
                if text not in seen[field]:
                    seen[field].append(text)
        return {f: ", ".join(v) for f, v in seen.items()}

    b, n = values(base_runtimes), values(new_runtimes)
    fields = [f for f in RUNTIME_FIELDS if f in b or f in n]
    fields += sorted((set(b) | set(n)) - set(fields) - set(RUNTIME_IGNORED))
    rows = [(f, b.get(f, "(absent)"), n.get(f, "(absent)"), f in RUNTIME_FIELDS) for f in fields
            if b.get(f) != n.get(f)]
    return pd.DataFrame(rows, columns=["field", "base", "new", "main"])


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def compare_reports(base_paths, new_paths, threshold: float = 0.05, confidence: float = 0.95,
                    familywise: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list[str], tuple]:
    """Compare the runs of two sides (report folders or runs.csv files) point by point.

    Returns:
      (the compare table, the runtime diff, run ids both sides hold, (base sources, new sources)). Run ids both
      sides hold also come as a warning: those rows are compared with themselves.

    Raises:
      CompareError: a side that cannot be read, or no point of one side matching one of the other.
    """
    base, new = read_side(base_paths), read_side(new_paths)
    table = compare(base.runs, new.runs, threshold=threshold, confidence=confidence, familywise=familywise)
    if not matched(table):
        raise CompareError(f"no point of {', '.join(map(str, base_paths))} matches one of "
                           f"{', '.join(map(str, new_paths))} on {', '.join(table.attrs['key'])}")
    shared = shared_runs(base, new)
    if shared:
        warnings.warn(f"base and new hold the same run ({', '.join(shared[:3])}): its rows are compared with "
                      "themselves, so every ratio is 1 and says nothing about a change", stacklevel=2)
    return table, runtime_diff(base.runtimes, new.runtimes), shared, (base.sources, new.sources)
