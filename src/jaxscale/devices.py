"""What the runtime has and what peak it will be measured against.

The peak per device comes from the spec table in flops.py when the device kind
is known (peak_source ``spec``), otherwise from a calibration measured here on
this machine and cached (peak_source ``measured``). An unknown kind is never
given a neighbour's figure. The CPU is always calibrated: its "peak" depends on
the host and on how many virtual devices share its cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale import flops


@dataclasses.dataclass(frozen=True)
class PeakInfo:
    """The figures MFU and the roofline are computed against, per device.

    Attributes:
      tflops: peak matmul TFLOP/s.
      dtype: the dtype that peak is for (spec peaks are dense bfloat16).
      source: ``spec`` (a datasheet, named in ``reference``) or ``measured``.
      reference: the datasheet or the calibration that gave the numbers.
      hbm_gbytes_per_s: memory bandwidth, GB/s (None if unknown).
      interconnect_gbytes_per_s: device-to-device bandwidth, GB/s (None if unknown).
      interconnect: which link that figure is for.
      memory_bytes: device memory (None if unknown).
      shared_host: True for the CPU, whose virtual devices share the host's
        cores and memory bus: a mesh of n of them gets 1/n of the host's peak
        each, whatever n is, so the per-device figures are ``for_devices(n)``.
    """

    tflops: float
    dtype: str
    source: str
    reference: str
    hbm_gbytes_per_s: float | None
    interconnect_gbytes_per_s: float | None
    interconnect: str
    memory_bytes: int | None
    shared_host: bool = False

    def for_devices(self, n: int) -> tuple[float, float | None]:
        """(peak TFLOP/s, memory GB/s) per device for a mesh of n devices."""
        if self.shared_host:
            host_tflops = self.tflops * jax.local_device_count()
            host_bw = self.hbm_gbytes_per_s * jax.local_device_count() if self.hbm_gbytes_per_s else None
            return host_tflops / n, (host_bw / n if host_bw else None)
        return self.tflops, self.hbm_gbytes_per_s


def cache_dir() -> Path:
    base = os.environ.get("JAXSCALE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxscale")
    return Path(base)


CALIBRATION_VERSION = 2  # bump when calibrate() measures differently; old entries are then ignored


def _calibration_key(dtype: str) -> str:
    d = jax.local_devices()[0]
    return f"v{CALIBRATION_VERSION}|{d.platform}|{d.device_kind}|{dtype}|{jax.local_device_count()}|{socket.gethostname()}"


def _load_calibrations() -> dict:
    path = cache_dir() / "calibration.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def calibrate(dtype: str = "bfloat16", size: int | None = None, repeats: int = 5, save: bool = True) -> dict:
    """Measure a practical matmul peak and memory bandwidth per device, all local devices at once.

    Every local device multiplies its own pair of size×size matrices (a batch
    sharded over the devices, so no communication); the best of ``repeats`` runs
    gives FLOP/s per device. Bandwidth is measured the same way with a large
    elementwise update (one read and one write per element).

    Returns:
      dict with tflops, hbm_gbytes_per_s, size, dtype, measured_at; cached under
      the device kind, dtype, local device count and host name.
    """
    devices = jax.local_devices()
    n = len(devices)
    if size is None:
        size = 1024 if devices[0].platform == "cpu" else 8192
    mesh = Mesh(np.array(devices), ("d",))
    sharded = NamedSharding(mesh, PartitionSpec("d"))
    dt = jnp.dtype(dtype)
    make = jax.jit(lambda k: jax.random.normal(k, (n, size, size), dt), out_shardings=sharded)
    a, b = make(jax.random.key(0)), make(jax.random.key(1))
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=dt),
                     out_shardings=sharded)
    best = _best_time(lambda: matmul(a, b), repeats)
    tflops = 2 * size ** 3 / best / 1e12
    elements = (64 << 20) // 4 if devices[0].platform == "cpu" else (1 << 30) // 4
    x = jax.jit(lambda: jnp.ones((n, elements), jnp.float32), out_shardings=sharded)()
    scale = jax.jit(lambda v: v * 1.0001, out_shardings=sharded)
    best_bw = _best_time(lambda: scale(x), repeats)
    # Interconnect: an all-reduce of a replicated-result sum over the devices; a ring
    # moves 2·(n−1)/n of the array through each device.
    link_gbs = None
    if n > 1:
        parts = jax.jit(lambda: jnp.ones((n, elements // 4), jnp.float32), out_shardings=sharded)()
        total = jax.jit(lambda v: jnp.sum(v, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
        best_ar = _best_time(lambda: total(parts), repeats)
        link_gbs = 2 * (n - 1) / n * (elements // 4) * 4 / best_ar / 1e9
    result = {"tflops": tflops, "hbm_gbytes_per_s": 2 * elements * 4 / best_bw / 1e9, "size": size,
              "interconnect_gbytes_per_s": link_gbs,
              "dtype": dtype, "n_local_devices": n, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if save:
        entries = _load_calibrations()
        entries[_calibration_key(dtype)] = result
        path = cache_dir() / "calibration.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    return result


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def resolve_peak(dtype: str, measure_if_missing: bool = True) -> PeakInfo:
    """The peak for this runtime's devices: the spec table, else a cached or fresh calibration."""
    device = jax.local_devices()[0]
    kind = device.device_kind
    hit = flops.lookup_peak(kind) if device.platform != "cpu" else None
    limit = _bytes_limit(device)
    if hit:
        key, peak = hit
        return PeakInfo(tflops=peak.bf16_tflops, dtype="bfloat16", source="spec",
                        reference=f"{peak.name}: {peak.source}", hbm_gbytes_per_s=peak.hbm_gbytes_per_s,
                        interconnect_gbytes_per_s=peak.interconnect_gbytes_per_s, interconnect=peak.interconnect,
                        memory_bytes=limit or int(peak.memory_gib * 2 ** 30))
    cached = _load_calibrations().get(_calibration_key(dtype))
    if cached is None:
        if not measure_if_missing:
            raise LookupError(f"no spec peak for device kind {kind!r} and no calibration; run `jaxscale calibrate`")
        cached = calibrate(dtype)
    return PeakInfo(tflops=cached["tflops"], dtype=dtype, source="measured",
                    reference=f"jaxscale calibrate, {cached['size']}^3 {dtype} matmul on {cached['n_local_devices']} "
                              f"{device.platform} devices, {cached['measured_at']}",
                    hbm_gbytes_per_s=cached.get("hbm_gbytes_per_s"),
                    interconnect_gbytes_per_s=cached.get("interconnect_gbytes_per_s"),
                    interconnect="measured all-reduce (jaxscale calibrate)" if cached.get(
                        "interconnect_gbytes_per_s") else "unknown", memory_bytes=limit, shared_host=device.platform == "cpu")


def _bytes_limit(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def describe() -> dict:
    """Backend, device kind and counts of the runtime."""
    d = jax.local_devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "host": socket.gethostname(),
    }
