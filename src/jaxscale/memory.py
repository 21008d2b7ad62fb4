"""Device memory: what a step needs, what a device has, and what a point may use.

- ``compiled_memory``: XLA's per-device figure for a compiled step
  (argument + output + temp − alias).
- ``device_memory``: the allocator's high-water mark and limit after a step ran.
- ``allocator_for``: how JAX's GPU allocator is set up before its backend starts
  (from ``[run] max_memory_fraction``, unless the user set it up).
- ``memory_budget``: the bytes a point may plan to use per device.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxscale.devices import PeakInfo


def compiled_memory(memory) -> dict:
    """Per-device bytes from XLA's CompiledMemoryStats; total = argument + output + temp − alias."""
    if memory is None:
        return {k: None for k in ("compiled_argument_bytes", "compiled_output_bytes", "compiled_temp_bytes",
                                  "compiled_alias_bytes", "compiled_total_bytes")}
    arg, out = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
    temp, alias = int(memory.temp_size_in_bytes), int(memory.alias_size_in_bytes)
    return {"compiled_argument_bytes": arg, "compiled_output_bytes": out, "compiled_temp_bytes": temp,
            "compiled_alias_bytes": alias, "compiled_total_bytes": arg + out + temp - alias}


def device_memory(devices) -> tuple[int | None, int | None]:
    """(largest peak_bytes_in_use, smallest bytes_limit) over the addressable devices.

    None where the backend keeps no allocator statistics (the CPU). The peak is
    the allocator's high-water mark since the process started.
    """
    peaks, limits = [], []
    for d in devices:
        if d.process_index != jax.process_index():
            continue
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if not stats:
            continue
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
        if "bytes_limit" in stats:
            limits.append(int(stats["bytes_limit"]))
    return (max(peaks) if peaks else None), (min(limits) if limits else None)


# What decides how much device memory JAX's GPU allocator may take. The user's
# setting of any of them wins over max_memory_fraction.
ALLOCATOR_ENV = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_ALLOCATOR")
# JAX's own default share of a GPU's memory (docs: GPU memory allocation).
JAX_DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Allocator:
    """How a point's process sets up JAX's GPU allocator (no effect on a CPU or TPU).

    Attributes:
      env: variables to set before the backend starts ({} where the user's own win).
      memory_fraction: the share of the device's memory the allocator may take,
        where it is known (None: the user chose an allocator whose limit is not a fraction).
      set_by: ``jaxscale`` (from ``max_memory_fraction``) or ``user`` (their environment).
      settings: the allocator variables in effect, as set.
    """

    env: dict
    memory_fraction: float | None
    set_by: str
    settings: dict

    def describe(self) -> dict:
        return {"memory_fraction": self.memory_fraction, "set_by": self.set_by, "env": self.settings}


def allocator_for(max_memory_fraction: float, environ=None) -> Allocator:
    """JAX's GPU allocator limit from ``[run] max_memory_fraction``, unless the user set it up themselves.

    JAX's allocator takes 75% of a GPU by default, so without this a step that
    needs 80% would fail on a device that has room for it, and the budget would
    be a fraction of a fraction. Where the user has set any of ALLOCATOR_ENV,
    nothing is changed and their setting is recorded.
    """
    environ = os.environ if environ is None else environ
    user = {k: environ[k] for k in ALLOCATOR_ENV if environ.get(k)}
    if not user:
        value = f"{max_memory_fraction:g}"
        return Allocator({"XLA_PYTHON_CLIENT_MEM_FRACTION": value}, max_memory_fraction, "jaxscale",
                         {"XLA_PYTHON_CLIENT_MEM_FRACTION": value})
    fraction = user.get("XLA_CLIENT_MEM_FRACTION") or user.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if user.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default").lower() == "platform":
        known = None  # allocates on demand from the driver: no fixed limit
    else:
        known = float(fraction) if fraction else JAX_DEFAULT_MEM_FRACTION
    return Allocator({}, known, "user", user)


def allocator_in_process(max_memory_fraction: float) -> Allocator:
    """allocator_for, applied to this process's environment if JAX's backends have not started yet."""
    allocator = allocator_for(max_memory_fraction)
    if not allocator.env:
        return allocator
    if _backends_started():
        return Allocator({}, None, "unknown", {"note": "JAX's backends started before jaxscale could set the "
                                                       "allocator up; its limit is JAX's or the caller's"})
    os.environ.update(allocator.env)
    return allocator


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # an internal module: where it moves, assume the worst
        return True


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


def memory_budget(peak: PeakInfo, fraction: float, allocator_fraction: float | None = None,
                  platform: str | None = None) -> MemoryBudget:
    """Bytes a point may plan to use per device: ``fraction`` of the device's memory.

    Args:
      peak: the run's PeakInfo; its memory_bytes is the allocator's bytes_limit
        where the backend reports one.
      fraction: ``[run] max_memory_fraction``.
      allocator_fraction: the share of a GPU JAX's allocator was set up to take
        (Allocator.memory_fraction); the device's memory is its limit over
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
