"""Run a profile's grid: compile, budget-check, time and record every point.

A point that fails becomes a row with a failure status (``compile_error``,
``oom``, ``over_budget``, ``error``) and the sweep goes on. Rows are appended
durably as they finish (records.RowWriter), so an interrupted sweep can be
resumed from its report folder without redoing or duplicating a point.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pandas as pd

from jaxscale import devices as devinfo
from jaxscale import flops
from jaxscale.config import ADDED_XLA_FLAGS_ENV, Profile, ProfileError, load_profile
from jaxscale.grid import GRID_COLUMNS, Point, build_grid
from jaxscale.measure import compiled_memory, describe_step, time_pipelined
from jaxscale.records import SCHEMA_VERSION, ReportDir, RowWriter, error_text, read_rows, row_key
from jaxscale.step import CompiledStep, compile_point

# Seams for the tests' fault injection (tests/hooks/jaxscale_faults.py), None in use:
# before_step(point, i) runs before a measured step's i-th dispatch (it may raise, or end the process);
# after_point(row) sees each measured row before it is recorded (it may change its memory columns).
before_step: Callable[[Point, int], None] | None = None
after_point: Callable[[dict], None] | None = None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What a sweep did.

    Attributes:
      rows: every row of the report's runs.csv (earlier runs included on resume).
      report_dir: the report folder (None on processes other than 0).
      dropped: reasons points were left out of the grid, with counts.
      skipped: points already recorded and not rerun (resume).
      interrupted: True when Ctrl-C stopped the sweep early.
    """

    rows: pd.DataFrame
    report_dir: Path | None
    dropped: collections.Counter
    skipped: int
    interrupted: bool

    @property
    def failed(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] != "ok"] if len(self.rows) else self.rows


def parse_selector(text: str) -> dict[str, str]:
    """``"strategy=fsdp,n_devices=8"`` → {"strategy": "fsdp", "n_devices": "8"}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ProfileError(f"selector {text!r}: expected column=value pairs separated by commas, "
                               "e.g. strategy=fsdp,n_devices=8")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in GRID_COLUMNS:
            raise ProfileError(f"selector {text!r}: unknown column {key!r}; use one of {', '.join(GRID_COLUMNS)}")
        out[key] = value
    return out


def matches(point: Point, selector: dict[str, str] | None) -> bool:
    if not selector:
        return False
    columns = point.grid_columns()
    return all(str(columns.get(k)) == v for k, v in selector.items())


def runtime_columns() -> dict:
    import flax
    import jaxlib

    from jaxscale.targets import libtpu_version

    d = jax.local_devices()[0]
    return {"backend": d.platform, "device_kind": d.device_kind, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
            "libtpu_version": libtpu_version(), "n_processes": jax.process_count()}


def toolchain_versions(backend: str | None = None) -> dict:
    """What else decides a step's speed: libtpu, the CUDA plugin, runtime, driver and cuDNN, and XLA flags.

    ``xla_flags`` is what the user set in XLA_FLAGS; ``xla_flags_added`` what
    jaxscale added itself (the CPU's virtual device count), which only the CPU
    backend reads. The CUDA plugin is asked for its libraries' versions on a
    GPU backend only (elsewhere loading them would only print that no GPU is there).
    """
    from jaxscale.targets import cuda_plugin_version, libtpu_version

    user, added = split_xla_flags(os.environ.get("XLA_FLAGS", ""), os.environ.get(ADDED_XLA_FLAGS_ENV, ""))
    return {"libtpu_version": libtpu_version(), "cuda_plugin_version": cuda_plugin_version(),
            **cuda_versions(ask_plugin=backend == "gpu"), "xla_flags": user, "xla_flags_added": added}


def split_xla_flags(flags: str, added: str) -> tuple[str, str]:
    """(the user's flags, jaxscale's own) of an XLA_FLAGS value, given the flags jaxscale added to it."""
    mine = set(added.split())
    words = flags.split()
    return " ".join(w for w in words if w not in mine), " ".join(w for w in words if w in mine)


# Wheels that carry the CUDA runtime and cuDNN, CUDA 12 and 13 names (13's runtime dropped the suffix).
CUDA_PACKAGES = ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13")
CUDNN_PACKAGES = ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def cuda_versions(ask_plugin: bool = True) -> dict:
    """CUDA runtime, driver and cuDNN versions as the CUDA plugin JAX loaded reports them.

    Each falls back to the version of the installed wheel (CUDA 12 or 13
    names) where the plugin cannot say (or ``ask_plugin`` is False); None
    where neither can (no CUDA).
    """
    import importlib.metadata

    out = {"cuda_version": None, "cudnn_version": None, "cuda_driver_version": None}
    versions = None
    if ask_plugin:
        try:
            from jax._src import lib as jax_lib

            versions = getattr(jax_lib, "cuda_versions", None)
        except ImportError:
            pass
    if versions is not None:
        for field, name, text in (("cuda_version", "cuda_runtime_get_version", cuda_version_text),
                                  ("cudnn_version", "cudnn_get_version", cudnn_version_text),
                                  ("cuda_driver_version", "cuda_driver_get_version", cuda_version_text)):
            try:
                out[field] = text(int(getattr(versions, name)()))
            except Exception:  # no driver, no library, or a plugin without the function
                pass
    for field, packages in (("cuda_version", CUDA_PACKAGES), ("cudnn_version", CUDNN_PACKAGES)):
        for package in packages if out[field] is None else ():
            try:
                out[field] = importlib.metadata.version(package)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def cuda_version_text(value: int) -> str:
    """CUDA's integer version (1000·major + 10·minor, e.g. 12090) as "12.9"."""
    return f"{value // 1000}.{value % 1000 // 10}"


def cudnn_version_text(value: int) -> str:
    """cuDNN's integer version as "9.8.0": 10000·major + 100·minor + patch from cuDNN 9, 1000·major before."""
    if value >= 90000:
        return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"
    return f"{value // 1000}.{value % 1000 // 100}.{value % 100}"


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """What a point may use per device, stated against the device's memory.

    Attributes:
      budget_bytes: max_memory_fraction of the device's memory, and never more
        than the allocator's limit; None where nothing is known.
      device_memory_bytes: the device's memory as JAX sees it, or None.
      bytes_limit: the allocator's limit, where the backend keeps one.
      source: how device_memory_bytes was found.
    """

    budget_bytes: int | None
    device_memory_bytes: int | None
    bytes_limit: int | None
    source: str

    def describe(self) -> dict:
        return {"memory_budget_bytes": self.budget_bytes, "device_memory_bytes": self.device_memory_bytes,
                "bytes_limit": self.bytes_limit, "device_memory_source": self.source}


def memory_budget(peak: devinfo.PeakInfo, fraction: float, allocator_fraction: float | None = None,
                  platform: str | None = None) -> MemoryBudget:
    """Bytes a point may plan to use per device: ``fraction`` of the device's memory.

    Args:
      peak: the run's PeakInfo; its memory_bytes is the allocator's bytes_limit
        where the backend reports one.
      fraction: ``[run] max_memory_fraction``.
      allocator_fraction: the share of a GPU JAX's allocator was set up to take
        (workers.Allocator.memory_fraction); the device's memory is its limit over
        that share. None on a TPU, whose limit is the whole HBM.
      platform: the backend (default: JAX's).

    On the CPU the device's memory is the host's physical memory shared by its
    local devices.
    """
    platform = platform or jax.default_backend()
    limit = peak.memory_bytes
    if limit and platform == "gpu" and allocator_fraction:
        device = int(limit / allocator_fraction)
        return MemoryBudget(min(int(device * fraction), limit), device, limit,
                            f"bytes_limit / the allocator's memory fraction {allocator_fraction:g}")
    if limit:
        return MemoryBudget(int(limit * fraction), limit, limit, "bytes_limit")
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return MemoryBudget(None, None, None, "unknown")
    device = int(host / jax.local_device_count())
    return MemoryBudget(int(device * fraction), device, None, "host memory / local devices")


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return "oom"
    return "error"


def base_row(point: Point, profile: Profile, columns: dict) -> dict:
    """The columns of a point's row known before it runs: grid, run settings, runtime, analytic counts."""
    run, m = profile.run, point.model
    row = {**point.grid_columns(), "dtype": run.dtype, "attention": run.attention, "scan_layers": run.scan_layers,
           "profile": run.name, "row_source": "measured", "schema_version": SCHEMA_VERSION,
           "timestamp_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           **columns, "status": "ok", "error": ""}
    row.update(params=flops.param_count(m.d_model, m.n_layers, m.vocab, m.d_ff),
               tokens_per_step=point.global_batch * m.seq_len,
               model_flops_per_step=flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch,
                                                      m.d_ff, recompute=False, causal=run.causal_flops),
               attention_flops=flops.ATTENTION_CAUSAL if run.causal_flops else flops.ATTENTION_FULL)
    return row


def measure_point(point: Point, profile: Profile, peak: devinfo.PeakInfo, trace_dir: Path | None = None,
                  memory: MemoryBudget | None = None) -> dict:
    """Compile and time one grid point; failures come back as a row, never raised.

    Returns:
      The row as a dict of schema columns.
    """
    run = profile.run
    row = base_row(point, profile, runtime_columns())
    budget = memory.budget_bytes if memory else None
    if memory:
        row["device_memory_bytes"], row["bytes_limit"] = memory.device_memory_bytes, memory.bytes_limit
    model_flops = row["model_flops_per_step"]
    try:
        compiled = compile_point(point, run)
    except Exception as exc:  # XLA and tracing errors come in many types
        row.update(status="compile_error" if _classify(exc) != "oom" else "oom", error=error_text(exc, 500))
        return row
    row["attention_impl"], row["attention_note"] = compiled.attention.impl, compiled.attention.note
    row["compile_s"] = compiled.compile_s
    row["params"] = compiled.params
    row["hosts"] = ";".join(sorted({f"p{d.process_index}" for d in compiled.mesh.devices.flat}))
    row["param_bytes"], row["opt_state_bytes"] = compiled.param_bytes, compiled.opt_state_bytes
    planned = compiled_memory(compiled.memory)["compiled_total_bytes"]
    over = budget is not None and planned is not None and planned > budget
    if jax.process_count() > 1:  # every process must take the same branch, or collectives would hang
        from jax.experimental import multihost_utils

        over = bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
    if over:
        row.update(status="over_budget", error=f"compiled step needs {planned} bytes per device, over the budget "
                                               f"of {budget}: max_memory_fraction={run.max_memory_fraction} of the "
                                               f"device's {memory.device_memory_bytes} bytes ({memory.source})")
        _fill_compiled_columns(row, compiled, peak)
        return row
    try:
        profile_ = _run_compiled(compiled, run, point, peak, model_flops, trace_dir)
    except Exception as exc:
        row.update(status=_classify(exc), error=error_text(exc, 500))
        _fill_compiled_columns(row, compiled, peak)
        gc.collect()
        return row
    row.update(profile_)
    if after_point is not None:
        after_point(row)
    if trace_dir is not None:
        row["trace_dir"] = str(trace_dir)
    return row


def _fill_compiled_columns(row: dict, compiled: CompiledStep, peak) -> None:
    from jaxscale.measure import compiled_memory, hidden_flops

    row.update(compiled_memory(compiled.memory))
    flops_ = compiled.cost.get("flops")
    if flops_ is not None:
        hidden = hidden_flops(compiled.hlo_text)
        row["xla_flops_per_step"] = (flops_ + hidden.flops_per_device) * compiled.point.n_devices
        row["custom_call_flops_per_step"] = hidden.flops_per_device * compiled.point.n_devices


def _run_compiled(compiled: CompiledStep, run, point: Point, peak, model_flops: float, trace_dir) -> dict:
    params, opt_state = compiled.init_state()
    batches = [compiled.make_batch(i) for i in range(2)]
    state = {"params": params, "opt": opt_state}
    losses = []
    hook = before_step

    def dispatch(i: int):
        if hook is not None:
            hook(point, i)
        state["params"], state["opt"], loss = compiled.compiled(state["params"], state["opt"], batches[i % 2])
        losses.append(loss)
        return loss

    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(trace_dir)):
            timing = time_pipelined(dispatch, run.steps, run.warmup)
    else:
        timing = time_pipelined(dispatch, run.steps, run.warmup)
    step = describe_step(timing=timing, compile_s=compiled.compile_s, cost=compiled.cost, memory=compiled.memory,
                         hlo_text=compiled.hlo_text, devices=list(compiled.mesh.devices.flat), peak=peak,
                         model_flops=model_flops, mesh=compiled.mesh).to_row()
    m = point.model
    analytic_xla = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                     recompute=point.remat == "full", causal=False)
    if step["custom_call_flops_per_step"]:  # fused attention: compare with what its kernels do, not the full square
        causal = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                   recompute=point.remat == "full", causal=True)
        analytic_xla += step["custom_call_flops_per_step"] - 2 * (analytic_xla - causal)
    out = {k: v for k, v in step.items() if k not in ("n_devices",)}
    out["tokens_per_s"] = point.global_batch * m.seq_len / timing.median_s
    out["loss_first"], out["loss_last"] = float(losses[0]), float(losses[-1])
    if step["xla_flops_per_step"]:
        ratio = step["xla_flops_per_step"] / analytic_xla
        out["xla_over_model_flops"] = ratio
        if not 0.95 <= ratio <= 1.25:
            out["flops_note"] = "; ".join(filter(None, [step["flops_note"], (
                f"XLA counts {ratio:.2f}x the analytic FLOPs with full attention"
                f"{' and recompute' if point.remat == 'full' else ''}: beyond the norms, softmax, loss and "
                "AdamW work that explains a few percent")]))
    del state, batches, params, opt_state
    return out


class _StopFlag:
    """First Ctrl-C: finish the current point, then stop. Second: abort now.

    The second raises KeyboardInterrupt wherever Python is; where it cannot be
    raised (a garbage-collection callback, a finalizer) Python would print it
    and go on, so that is kept quiet here and ``abort`` makes the sweep raise it
    once the point returns.
    """

    def __init__(self):
        self.stop = False
        self.abort = False
        self._previous = None
        self._hook = None

    def __enter__(self):
        if _is_main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handle(self, signum, frame):
        if self.stop:
            self.abort = True
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: stopping after the current point (again to abort now)", file=sys.stderr)

    def _unraisable(self, info):
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self._hook(info)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._hook


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class InProcess:
    """Isolation ``none``: every point is measured in this process (which may be one of several hosts).

    The interface the sweep loop uses; workers.WorkerRuntime is the other one.
    """

    isolation = "none"

    def __init__(self, profile: Profile):
        from jaxscale import workers

        allocator = workers.allocator_in_process(profile.run.max_memory_fraction)  # before the backend starts
        self.profile = profile
        self.device_count, self.process_count = jax.device_count(), jax.process_count()
        self.lead = jax.process_index() == 0
        self.describe, self.columns = devinfo.describe(), runtime_columns()
        self.peak = devinfo.resolve_peak(profile.run.dtype)
        self.memory = memory_budget(self.peak, profile.run.max_memory_fraction, allocator.memory_fraction)
        self.allocator = allocator

    def broadcast(self, values: list[int]) -> list[int]:
        """Process 0's values, on every process."""
        if self.process_count == 1:
            return list(values)
        from jax.experimental import multihost_utils

        return [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, dtype=np.int32))]

    def measure(self, point: Point, index: int, trace_dir: Path | None) -> dict:
        row = measure_point(point, self.profile, self.peak, trace_dir, self.memory)
        row["isolation"] = "none"
        if self.process_count > 1:  # keep every process on the same point
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxscale point {index}")
        return row

    def should_stop(self, index: int, stop: bool) -> bool:
        if self.process_count == 1:
            return stop
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(stop))
        return bool(np.asarray(flags).any())

    def close(self) -> None:
        pass


def open_runtime(profile: Profile, dist=None, compile_cache: bool = True):
    """Where the points of a profile run: InProcess, or a workers.WorkerRuntime (workers.choose_isolation).

    For isolation ``none`` on several hosts, jax.distributed must already be
    initialized (workers.init_distributed); worker owners join their own session.
    """
    from jaxscale import workers

    if workers.choose_isolation(profile.run) == "process":
        return workers.WorkerRuntime(profile, dist=dist, compile_cache=compile_cache)
    return InProcess(profile)


def plan(profile: Profile, runtime=None) -> tuple[list[Point], collections.Counter]:
    """The grid of a profile for a runtime's devices and processes (default: this process's JAX runtime)."""
    if runtime is None:
        return build_grid(profile, jax.device_count(), jax.process_count())
    return build_grid(profile, runtime.device_count, runtime.process_count)


def run_profile(
    profile: Profile,
    report_dir: Path,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    trace: str | None = None,
    on_point: Callable[[Point, int, int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    runtime=None,
) -> SweepResult:
    """Run every grid point of a profile and append its rows to report_dir/runs.csv.

    Args:
      profile: the validated profile.
      report_dir: the report folder (created by process 0 only).
      resume: skip points already recorded in report_dir/runs.csv.
      retry_failed: with resume, rerun points whose recorded status is not ok.
      trace: a selector on grid columns; matching points are traced with
        jax.profiler into report_dir/traces/.
      on_point: called before each point with (point, index, total) — progress.
      on_row: called with each finished row.
      runtime: where points run (open_runtime); by default chosen from the
        profile's isolation and closed at the end.

    Returns:
      A SweepResult.
    """
    own_runtime = runtime is None
    if own_runtime:
        runtime = open_runtime(profile)
    try:
        return _run_points(profile, report_dir, runtime, resume=resume, retry_failed=retry_failed, trace=trace,
                           on_point=on_point, on_row=on_row)
    finally:
        if own_runtime:
            runtime.close()


def _run_points(profile, report_dir, runtime, *, resume, retry_failed, trace, on_point, on_row) -> SweepResult:
    points, dropped = plan(profile, runtime)
    selector = parse_selector(trace) if trace else None
    lead = runtime.lead
    csv_path = report_dir / "runs.csv"
    done: set[tuple] = set()
    if resume and lead and csv_path.exists():
        previous = read_rows(csv_path)
        for _, r in previous.iterrows():
            if retry_failed and r["status"] != "ok":
                continue
            done.add(row_key(r))
        if retry_failed and len(previous):
            _rewrite(csv_path, previous[previous["status"] == "ok"])
    # only process 0 holds the rows: every process skips what it skips
    skip = runtime.broadcast([int(p.key in done) for p in points])
    todo = [p for p, s in zip(points, skip) if not s]
    skipped = len(points) - len(todo)
    if lead:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "profile.toml").write_text(profile.to_toml())
        (report_dir / "runtime.json").write_text(json.dumps({**runtime.describe, **runtime.columns,
                                                             **toolchain_versions(runtime.columns.get("backend")),
                                                             "isolation": runtime.isolation,
                                                             "peak": dataclasses.asdict(runtime.peak),
                                                             **runtime.memory.describe(),
                                                             "allocator": runtime.allocator.describe()}, indent=1))
    writer = RowWriter(csv_path) if lead else None
    interrupted = False
    try:
        with _StopFlag() as flag:
            for i, point in enumerate(todo):
                if on_point:
                    on_point(point, i, len(todo))
                trace_dir = None
                if matches(point, selector):
                    trace_dir = report_dir / "traces" / f"{point.model.size_name}-{point.strategy}-n{point.n_devices}"
                row = runtime.measure(point, i, trace_dir)
                if writer:
                    writer.append(row)
                if flag.abort:  # a second Ctrl-C that could not be raised where it arrived
                    raise KeyboardInterrupt
                if on_row:
                    on_row(row)
                if runtime.should_stop(i, flag.stop) and i + 1 < len(todo):
                    interrupted = True
                    break
    finally:
        if writer:
            writer.close()
    rows = read_rows(csv_path) if csv_path.exists() else pd.DataFrame()
    return SweepResult(rows=rows, report_dir=report_dir if lead else None, dropped=dropped, skipped=skipped,
                       interrupted=interrupted)


def _rewrite(path: Path, frame: pd.DataFrame) -> None:
    """Replace runs.csv with the given rows (used by --retry-failed), atomically."""
    tmp = path.with_suffix(".tmp")
    if tmp.exists():
        tmp.unlink()
    with RowWriter(tmp) as writer:
        for _, r in frame.iterrows():
            writer.append({k: ("" if pd.isna(v) else v) for k, v in r.items() if k in set(frame.columns)})
    os.replace(tmp, path)


def run_sweep(profile: str | Profile, out: Path | str | None = None, overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """Run a profile (a path, a shipped name or a Profile) and return its rows as a DataFrame.

    The notebook entry point: no progress bar, no analysis, rows also written to
    a report folder under ``out`` (default ``reports/``).
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile, overrides)
    report = ReportDir.for_run(profile.run.name, out)
    try:
        runtime = open_runtime(profile)
        try:
            plan(profile, runtime)  # validate against the runtime before anything is written
            result = run_profile(profile, report.path, runtime=runtime)
        finally:
            runtime.close()
    finally:
        report.discard()  # releases it; removes it if nothing was recorded
    return result.rows
