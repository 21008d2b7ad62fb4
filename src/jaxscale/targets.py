"""Where a point compiles: the local devices, or a TPU slice it only compiles for.

``jaxscale plan --topology v5e:16x16`` compiles every grid point for the slice a
user would rent for its chip count, with the real TPU compiler (libtpu) on a
machine that has no TPU: ``jax.experimental.topologies.get_topology_desc``
gives the devices of a slice (with the hosts they belong to) and
``jit(...).lower(...).compile()`` against a mesh of them gives the TPU's own
cost analysis, memory analysis and optimized HLO. Nothing runs and nothing is
allocated on any device.

A point of n chips compiles for the smallest standard slice of the generation
with at least n chips (4 → v5e:2x2, 8 → v5e:2x4, 16 → v5e:4x4); below the
smallest slice, it takes the first n chips of one host of that slice (a mesh
spread over several hosts of a larger slice fails inside the TPU compiler).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re

# The standard slice shapes of each generation, smallest first (Cloud TPU docs:
# v5e and v6e slices are 2-D, v5p and v4 3-D); the chip count is their product.
SLICE_SHAPES: dict[str, tuple[str, ...]] = {
    "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16"),
}
_TOPOLOGY = re.compile(r"^(v5e|v6e|v5p):(\d+(?:x\d+){1,2})$")


class TargetError(ValueError):
    """A target that cannot be planned for, phrased for the person who named it."""


def chips(shape: str) -> int:
    n = 1
    for part in shape.split("x"):
        n *= int(part)
    return n


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice to plan for, e.g. ``v5e:16x16``: its generation and chip count.

    Attributes:
      name: as given (``v5e:16x16``).
      generation: ``v5e``, ``v6e`` or ``v5p``.
      shape: the slice shape (``16x16``).
      n_chips: chips in the slice, the largest device count it can plan.
    """

    name: str
    generation: str
    shape: str
    n_chips: int

    @property
    def platform(self) -> str:
        return "tpu"

    def slice_for(self, n: int) -> str:
        """The topology a user would rent for n chips: the smallest standard slice with ≥ n."""
        for shape in SLICE_SHAPES[self.generation]:
            if chips(shape) >= n:
                return f"{self.generation}:{shape}"
        return self.name

    def devices_for(self, n: int) -> list:
        """n compile-only devices of the slice for n chips, from one host first."""
        devices = slice_devices(self.slice_for(n))
        if n == len(devices):
            return list(devices)
        by_host: dict[int, list] = {}
        for d in devices:
            by_host.setdefault(d.process_index, []).append(d)
        first = sorted(by_host[min(by_host)], key=lambda d: d.id)
        if n > len(first):
            raise TargetError(f"{n} chips is not a slice of {self.generation} and does not fit on one host")
        return first[:n]


def parse_target(text: str) -> Target:
    """``v5e:16x16`` → Target; a TargetError names what is accepted."""
    m = _TOPOLOGY.match(text.strip().lower())
    if not m:
        shapes = "; ".join(f"{g}: {', '.join(s)}" for g, s in SLICE_SHAPES.items())
        raise TargetError(f"--topology {text!r}: expected GENERATION:SHAPE with a standard slice shape ({shapes}), "
                          "e.g. v5e:16x16 or v5p:4x4x4")
    generation, shape = m.groups()
    if shape not in SLICE_SHAPES[generation]:
        raise TargetError(f"--topology {text!r}: {shape} is not a standard {generation} slice; use one of "
                          f"{', '.join(SLICE_SHAPES[generation])}")
    return Target(name=f"{generation}:{shape}", generation=generation, shape=shape, n_chips=chips(shape))


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is not installed."""
    for name in ("libtpu", "libtpu-nightly"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_libtpu() -> None:
    if libtpu_version() is None:
        raise TargetError("planning for a TPU needs the TPU compiler, which is not installed: "
                          "pip install 'jaxscale[tpu]' (or pip install 'jax[tpu]')")


def quiet_tpu_runtime() -> None:
    """Let libtpu load on a machine with no TPU attached, quietly and in several processes.

    Loaded where there is no TPU (to compile for a topology, or just because it
    is installed), libtpu asks the Cloud TPU metadata server for the accelerator
    type and the worker hosts and prints errors when there is none; it also
    allows one process at a time through a lock file. Where no TPU chip is
    attached, tell it it is a lone host and let several processes load it
    (JAX's own multi-process tests do the same). Where a TPU is attached,
    nothing changes. Call before JAX initializes its backends.
    """
    if libtpu_version() is None or _tpu_chips_attached():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _tpu_chips_attached() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # an internal helper: when it moves, fall back to the device files
        return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


@functools.lru_cache(maxsize=32)
def slice_devices(topology: str) -> tuple:
    """The compile-only devices of a TPU topology (cached: each load costs libtpu time)."""
    from jax.experimental import topologies

    require_libtpu()
    quiet_tpu_runtime()
    return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
