"""What the devices are, what peak they are measured against, and which link each mesh axis uses.

The peak per device comes from the spec table in chips.py when the device kind
is known (peak_source ``spec``), for the math mode the run's matmuls execute in
(chips.matmul_math_mode), otherwise from a calibration measured here on this
machine and cached (peak_source ``measured``). An unknown kind is never given a
neighbour's figure. The CPU is always calibrated: its "peak" depends on the
host and on how many virtual devices share its cores.

``spec_peak``, ``devices_per_chip``, ``axis_crossings`` and ``mesh_axis_links``
need no backend: a plan passes a TPU topology's devices (or any objects with
``process_index``/``slice_index``) and a device kind.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale import chips
from jaxscale.startup import cache_dir


@dataclasses.dataclass(frozen=True)
class PeakInfo:
    """The figures MFU, the roofline and predicted communication are computed against, per device.

    Attributes:
      tflops: peak matmul TFLOP/s in the math mode the run's matmuls execute
        in, or None where the datasheet gives none for it (``note`` says why).
      dtype: that math mode (``bf16``, ``tf32``, ``fp32``; for a calibration,
        the calibrated dtype).
      precision: how the run's matmuls map to that mode (operand dtype and
        jax_default_matmul_precision).
      source: ``spec`` (a datasheet, named in ``reference``) or ``measured``.
      reference: the datasheet or the calibration that gave the numbers.
      hbm_gbytes_per_s: memory bandwidth, GB/s (None if unknown).
      interconnect_gbytes_per_s: bandwidth of the link inside a host or slice, GB/s.
      interconnect: which link that is.
      memory_bytes: device memory (None if unknown).
      shared_host: True for the CPU, whose virtual devices share the host's
        cores and memory bus: a mesh of n of them gets 1/n of the host's peak
        each, whatever n is, so the per-device figures are ``for_devices(n)``.
      note: why tflops is None, else "".
      local_link, remote_link: links inside and across hosts (GPU) or slices
        (TPU), see chips.Chip; None where unknown.
      platform: ``gpu``, ``tpu`` or ``cpu``.
    """

    tflops: float | None
    dtype: str
    source: str
    reference: str
    hbm_gbytes_per_s: float | None
    interconnect_gbytes_per_s: float | None
    interconnect: str
    memory_bytes: int | None
    shared_host: bool = False
    precision: str = ""
    note: str = ""
    local_link: chips.Link | None = None
    remote_link: chips.Link | None = None
    platform: str = ""

    def __post_init__(self):
        # Rebuilt from dataclasses.asdict (a worker's JSON report), links arrive as dicts.
        for name in ("local_link", "remote_link"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, chips.Link(**value))

    def for_devices(self, n: int) -> tuple[float | None, float | None]:
        """(peak TFLOP/s, memory GB/s) per device for a mesh of n devices."""
        if self.shared_host:
            host_tflops = self.tflops * jax.local_device_count() if self.tflops else None
            host_bw = self.hbm_gbytes_per_s * jax.local_device_count() if self.hbm_gbytes_per_s else None
            return (host_tflops / n if host_tflops else None), (host_bw / n if host_bw else None)
        return self.tflops, self.hbm_gbytes_per_s


def devices_per_chip(devices) -> int:
    """How many JAX devices share one chip: 2 where a topology exposes each TensorCore of a TPU v4 or v5p
    chip as a device (``core_on_chip`` 0 and 1, no megacore), else 1. Pure: any objects with ``coords`` and
    ``core_on_chip`` (devices without them count as whole chips)."""
    per_chip: dict[tuple, set] = {}
    for d in devices:
        coords, core = getattr(d, "coords", None), getattr(d, "core_on_chip", None)
        if coords is None or core is None:
            return 1
        per_chip.setdefault(tuple(coords), set()).add(core)
    return max((len(v) for v in per_chip.values()), default=1)


def spec_peak(device_kind: str, platform: str, dtype: str, precision: str | None = None,
              memory_bytes: int | None = None, per_chip: int = 1) -> PeakInfo | None:
    """The datasheet PeakInfo of a device kind for a run's dtype, without touching a backend.

    Args:
      device_kind: as jax reports it (``"TPU v5 lite"``).
      platform: ``gpu`` or ``tpu`` (how float32 matmuls execute depends on it).
      dtype: the run's compute dtype (``bfloat16`` or ``float32``).
      precision: jax_default_matmul_precision (None: JAX's default).
      memory_bytes: the allocator's limit, where known, instead of the datasheet's memory.
      per_chip: JAX devices per chip (``devices_per_chip``): the chip's peak,
        memory bandwidth, memory and links are split evenly between them.

    Returns:
      PeakInfo with source ``spec``, or None when the kind has no datasheet
      entry. A known kind whose datasheet has no peak for the math mode the
      matmuls run in gets tflops None and a note: never another mode's figure.
    """
    chip = chips.chip_for_kind(device_kind)
    if chip is None:
        return None
    mode, how = chips.matmul_math_mode(platform, dtype, precision)
    peak = chips.device_peak(device_kind, mode) if mode else None
    note = ""
    if peak is None:
        note = (f"{chip.name}: {how}; " if mode is None else
                f"{chip.name}: {how}, and the datasheet gives no {mode} peak; ") + "MFU and HFU left empty"
    def split(link: chips.Link) -> chips.Link:
        if per_chip == 1 or link.gbytes_per_s is None:
            return link
        return chips.Link(link.name, link.gbytes_per_s / per_chip, f"{link.source}; shared by {per_chip} cores")

    local, remote = split(chip.local_link), split(chip.remote_link)
    memory = memory_bytes or (int(chip.memory_gbytes * 1e9 / per_chip) if chip.memory_gbytes else None)
    reference = f"{chip.name}: {chip.tflops_source}; {chip.memory_source}"
    if per_chip > 1:
        reference += f"; one chip's figures split over its {per_chip} cores, one JAX device each"
    return PeakInfo(tflops=peak.tflops / per_chip if peak else None, dtype=mode or "", precision=how,
                    source="spec", reference=reference, hbm_gbytes_per_s=chip.hbm_gbytes_per_s / per_chip,
                    interconnect_gbytes_per_s=local.gbytes_per_s, interconnect=local.name, memory_bytes=memory,
                    note=note, local_link=local, remote_link=remote, platform=chip.platform)


# ------------------------------------------------------------ links per mesh axis


@dataclasses.dataclass(frozen=True)
class AxisLink:
    """The link a mesh axis's collectives travel over.

    Attributes:
      axis: the mesh axis name.
      crosses: ``none`` (all devices along the axis share a host, or a TPU
        slice), ``hosts`` (GPU/CPU devices along it sit on different hosts) or
        ``slices`` (TPU devices along it sit in different slices).
      link: the Link used, or None where the table has none.
    """

    axis: str
    crosses: str
    link: chips.Link | None
    factor: float = 1.0
    rings: str = ""

    @property
    def gbytes_per_s(self) -> float | None:
        """The link's figure times ``factor``: on a TPU, the torus dimensions the axis spans (tpu_axis_rings)."""
        return self.link.gbytes_per_s * self.factor if self.link and self.link.gbytes_per_s else None

    @property
    def label(self) -> str:
        """What the row's link column shows, e.g. ``NVLink4``, ``InfiniBand NDR (crosses hosts)`` or
        ``ICI (2 torus dims, wraparound)``."""
        name = self.link.name if self.link else "unknown link"
        if self.crosses != "none":
            return f"{name} (crosses {self.crosses})"
        return f"{name} ({self.rings})" if self.rings else name


def ici_wraparound(device_kind: str, torus: tuple[int, ...]) -> tuple[bool, ...]:
    """Which dimensions of a TPU slice close into rings (wraparound links).

    JAX scaling book, "How to Think About TPUs" (bidirectional bandwidth note): the
    inference chips (v5e, v6e: device kinds "TPU v5 lite", "TPU v6 lite") have a
    wraparound only along a full axis of 16 chips, the pod's edge (so a 16x16 slice has
    them, a 4x4 or 8x8 does not); the training chips (v4, v5p) along an axis that is a
    multiple of 4 (whole cubes, closed by the optical switches).
    """
    lite = "lite" in device_kind.lower() or device_kind.lower() in ("tpu v5e", "tpu v6e")
    return tuple((d == 16) if lite else (d >= 4 and d % 4 == 0) for d in torus)


def tpu_axis_rings(group, torus: tuple[int, ...], wrap: tuple[bool, ...]) -> tuple[float, str]:
    """(bandwidth factor, description) of a mesh axis whose devices (one group along it) lie on a TPU torus.

    The chip's ICI figure (chips.Chip.local_link) is a ring along one torus dimension
    with its wraparound: both of the chip's ports on that dimension, one way each. A
    dimension the group spans whole and that has a wraparound adds 1; one without
    (a line, or part of a dimension) adds ½, since data from the ends must cross
    every hop in one direction (the scaling book's AllGather over an axis with no
    wraparound: (N−1)·V/N over one-way link bandwidth, against V over the
    bidirectional one). Dimensions add up, since a collective over several axes of
    the torus uses the links of each (scaling book, "AllGather over multiple axes").
    Devices without ``coords`` give (1, "").
    """
    coords = [getattr(d, "coords", None) for d in group]
    if not coords or any(c is None for c in coords) or len(group) < 2:
        return 1.0, ""
    factor, wrapped, lines = 0.0, 0, 0
    for dim in range(min(len(torus), len(coords[0]))):
        distinct = len({tuple(c)[dim] for c in coords})
        if distinct < 2:
            continue
        if wrap[dim] and distinct == torus[dim]:
            factor, wrapped = factor + 1.0, wrapped + 1
        else:
            factor, lines = factor + 0.5, lines + 1
    if factor == 0:
        return 1.0, ""
    parts = [f"{n} torus dim{'s' if n > 1 else ''}, {kind}" for n, kind in ((wrapped, "wraparound"),
                                                                         (lines, "no wraparound")) if n]
    return factor, "; ".join(parts)


def axis_crossings(host_of: np.ndarray) -> list[bool]:
    """For each axis of a grid of host (or slice) ids: do devices along it differ?

    Pure: ``host_of`` is an array shaped like the mesh holding each device's
    host or slice identifier.
    """
    host_of = np.asarray(host_of)
    out = []
    for a in range(host_of.ndim):
        moved = np.moveaxis(host_of, a, -1).reshape(-1, host_of.shape[a])
        out.append(bool((moved != moved[:, :1]).any()))
    return out


def mesh_axis_links(devices: np.ndarray, axis_names, platform: str, local_link: chips.Link | None,
                    remote_link: chips.Link | None, torus: tuple[int, ...] | None = None) -> dict[str, AxisLink]:
    """The link each mesh axis uses, from where its devices sit.

    On a TPU, ICI joins every chip of a slice, hosts included, so only an
    axis whose devices lie in different slices (``slice_index``) leaves ICI,
    for the data-center network. On GPUs and CPUs an axis whose devices
    belong to different processes crosses hosts (jaxscale runs one process per
    host) and uses the host network. Pure: ``devices`` is any array of objects
    with ``process_index`` (and, for multi-slice TPUs, ``slice_index``), shaped
    like the mesh, so a plan can pass a topology's devices.

    On a TPU whose devices carry ``coords``, an axis inside a slice gets the ICI of
    every torus dimension it spans (tpu_axis_rings), wraparounds included where the
    slice has them (``torus``: the slice's shape; default: the extent of the mesh's
    own coordinates).

    Returns:
      {axis name: AxisLink}.
    """
    devices = np.asarray(devices, dtype=object)
    if platform == "tpu":
        where = np.vectorize(lambda d: getattr(d, "slice_index", 0) or 0, otypes=[int])(devices)
        crossing = "slices"
    else:
        where = np.vectorize(lambda d: d.process_index, otypes=[int])(devices)
        crossing = "hosts"
    coords = [getattr(d, "coords", None) for d in devices.flat]
    if platform == "tpu" and torus is None and coords and all(c is not None for c in coords):
        torus = tuple(int(max(c[k] for c in coords)) + 1 for k in range(len(coords[0])))
    wrap = ici_wraparound(getattr(devices.flat[0], "device_kind", ""), torus) if torus else ()
    out = {}
    for a, (name, crosses) in enumerate(zip(axis_names, axis_crossings(where))):
        factor, rings = 1.0, ""
        if platform == "tpu" and not crosses and torus:
            group = np.moveaxis(devices, a, -1).reshape(-1, devices.shape[a])[0]
            factor, rings = tpu_axis_rings(list(group), torus, wrap)
        out[name] = AxisLink(name, crossing if crosses else "none", remote_link if crosses else local_link,
                             factor, rings)
    return out


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
    """The peak for this runtime's devices: the spec table, else a cached or fresh calibration.

    The spec peak is the one of the math mode the run's matmuls execute in
    (chips.matmul_math_mode, with the jax_default_matmul_precision in effect).
    """
    device = jax.local_devices()[0]
    kind = device.device_kind
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    limit = _bytes_limit(device)
    if platform != "cpu":
        spec = spec_peak(kind, platform, dtype, jax.config.jax_default_matmul_precision, limit,
                         per_chip=devices_per_chip(jax.devices()))
        if spec is not None:
            return spec
    cached = _load_calibrations().get(_calibration_key(dtype))
    if cached is None:
        if not measure_if_missing:
            raise LookupError(f"no spec peak for device kind {kind!r} and no calibration; run `jaxscale calibrate`")
        cached = calibrate(dtype)
    measured_link = cached.get("interconnect_gbytes_per_s")
    local = chips.Link("measured all-reduce (jaxscale calibrate)", measured_link,
                       "jaxscale calibrate: all-reduce over the local devices") if measured_link else None
    return PeakInfo(tflops=cached["tflops"], dtype=dtype, source="measured",
                    reference=f"jaxscale calibrate, {cached['size']}^3 {dtype} matmul on {cached['n_local_devices']} "
                              f"{device.platform} devices, {cached['measured_at']}",
                    hbm_gbytes_per_s=cached.get("hbm_gbytes_per_s"),
                    interconnect_gbytes_per_s=measured_link,
                    interconnect=local.name if local else "unknown", memory_bytes=limit,
                    shared_host=device.platform == "cpu", precision=f"{dtype} matmul, calibrated",
                    local_link=local, remote_link=None, platform=platform)


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
