"""Where a point compiles: the local devices, or a target it only compiles for; the versions that compiled it.

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

GPU clusters work the same way (``--topology h100:4x8``, hosts × GPUs per
host): XLA's GPU compiler compiles for a GPU it does not have from a target
description (GPU_TARGETS, written from each part's published properties), with
the CUDA plugin installed (``pip install 'jaxscale[gpu-plan]'``, about 0.5 GB:
the plugin and PJRT only, no CUDA libraries, since nothing runs). n GPUs take
one host when they fit on one, else n / GPUs-per-host hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import re

from jaxscale.config import ADDED_XLA_FLAGS_ENV, BadInput

# The standard slice shapes of each generation, smallest first (Cloud TPU docs:
# v5e and v6e slices are 2-D, v5p and v4 3-D); the chip count is their product.
SLICE_SHAPES: dict[str, tuple[str, ...]] = {
    "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16"),
}
_TOPOLOGY = re.compile(r"^(v5e|v6e|v5p):(\d+(?:x\d+){1,2})$")
_GPU_TOPOLOGY = re.compile(r"^(h100|h200|a100):(\d+)x(\d+)$")

# GPU target descriptions (stream_executor GpuTargetConfigProto, text format), from
# the parts' published properties. H100 SXM5 (NVIDIA H100 datasheet and Hopper
# tuning guide): compute capability 9.0, 132 SMs, 128 FP32 lanes and 228 KiB of
# shared memory per SM (227 KiB per block opt-in), 50 MiB L2, 1.98 GHz boost,
# 3.35 TB/s of HBM3, 80 GiB. A100 SXM4 80GB (A100 datasheet and Ampere tuning
# guide): compute capability 8.0, 108 SMs, 64 FP32 lanes and 164 KiB of shared
# memory per SM (163 KiB per block opt-in), 40 MiB L2, 1.41 GHz boost, 2.039 TB/s
# of HBM2e, 80 GiB. H200 SXM (NVIDIA H200 datasheet): the H100 SXM's GH100 die, compute
# capability, SMs and clocks, with 141 GB of HBM3e at 4.8 TB/s.
_GPU_INFO = """gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {smem_block}
  shared_memory_per_core: {smem_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{kind}"
"""
GPU_TARGETS: dict[str, str] = {
    "h100": _GPU_INFO.format(major=9, minor=0, smem_block=232448, smem_sm=233472, sms=132, fpus=128,
                             bandwidth=3352000000000, l2=52428800, clock=1.98, memory=85899345920,
                             kind="NVIDIA H100 80GB HBM3"),
    "h200": _GPU_INFO.format(major=9, minor=0, smem_block=232448, smem_sm=233472, sms=132, fpus=128,
                             bandwidth=4800000000000, l2=52428800, clock=1.98, memory=141000000000,
                             kind="NVIDIA H200"),
    "a100": _GPU_INFO.format(major=8, minor=0, smem_block=166912, smem_sm=167936, sms=108, fpus=64,
                             bandwidth=2039000000000, l2=41943040, clock=1.41, memory=85899345920,
                             kind="NVIDIA A100-SXM4-80GB"),
}


class TargetError(BadInput):
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
    gpus_per_host: int = 0  # GPU targets only

    @property
    def platform(self) -> str:
        return "gpu" if self.generation in GPU_TARGETS else "tpu"

    def slice_for(self, n: int) -> str:
        """The topology a user would rent for n chips: the smallest standard slice with ≥ n
        (GPUs: one host when n fits on one, else n / GPUs-per-host hosts)."""
        if self.platform == "gpu":
            if n <= self.gpus_per_host:
                return f"{self.generation}:1x{n}"
            if n % self.gpus_per_host:
                raise TargetError(f"{n} GPUs do not fill whole hosts of {self.gpus_per_host}")
            return f"{self.generation}:{n // self.gpus_per_host}x{self.gpus_per_host}"
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
    """``v5e:16x16`` or ``h100:4x8`` → Target; a TargetError names what is accepted."""
    gpu = _GPU_TOPOLOGY.match(text.strip().lower())
    if gpu:
        name, hosts, per_host = gpu.group(1), int(gpu.group(2)), int(gpu.group(3))
        if not hosts or not per_host or per_host > 8:
            raise TargetError(f"--topology {text!r}: expected HOSTSxGPUS with 1 to 8 GPUs per host, e.g. h100:4x8")
        return Target(name=f"{name}:{hosts}x{per_host}", generation=name, shape=f"{hosts}x{per_host}",
                      n_chips=hosts * per_host, gpus_per_host=per_host)
    m = _TOPOLOGY.match(text.strip().lower())
    if not m:
        shapes = "; ".join(f"{g}: {', '.join(s)}" for g, s in SLICE_SHAPES.items())
        raise TargetError(f"--topology {text!r}: expected GENERATION:SHAPE with a standard slice shape ({shapes}), "
                          f"e.g. v5e:16x16 or v5p:4x4x4, or a GPU cluster as HOSTSxGPUS of "
                          f"{' or '.join(GPU_TARGETS)}, e.g. h100:4x8")
    generation, shape = m.groups()
    if shape not in SLICE_SHAPES[generation]:
        raise TargetError(f"--topology {text!r}: {shape} is not a standard {generation} slice; use one of "
                          f"{', '.join(SLICE_SHAPES[generation])}")
    return Target(name=f"{generation}:{shape}", generation=generation, shape=shape, n_chips=chips(shape))


def target_of(topology: str | None, profile_topology: str | None, source: str) -> Target:
    """The target a plan compiles for: ``--topology``, else the profile's ``[mesh] topology``.

    Raises:
      TargetError: none given, spaces around it, or not a known slice or GPU cluster.
    """
    if not (topology or profile_topology):
        raise TargetError(f"{source}: no target: give --topology (e.g. v5e:16x16) or [mesh] topology")
    if topology and topology != topology.strip():
        raise TargetError(f"--topology {topology!r}: spaces around the target; give --topology {topology.strip()}")
    target = parse_target(topology or profile_topology)
    require_compiler(target)
    return target


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is not installed."""
    for name in ("libtpu", "libtpu-nightly"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cuda_plugin_version() -> str | None:
    """The installed JAX CUDA plugin's version, or None."""
    try:
        return importlib.metadata.version("jax-cuda12-plugin")
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_columns(target: Target | None = None, device_kind: str | None = None,
                    n_processes: int | None = None) -> dict:
    """The runtime columns of a row: backend, device kind, process count and the versions that compiled it.

    Without a target: this process's local devices (libtpu's version wherever it
    is installed). For a target: its platform, the given device kind and the
    hosts of its slice (libtpu's version on a TPU target only).
    """
    import flax
    import jax
    import jaxlib

    versions = {"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
                "flax_version": flax.__version__}
    if target is None:
        d = jax.local_devices()[0]
        return {"backend": d.platform, "device_kind": d.device_kind, **versions,
                "libtpu_version": libtpu_version(), "n_processes": jax.process_count()}
    return {"backend": target.platform, "device_kind": device_kind, **versions,
            "libtpu_version": libtpu_version() if target.platform == "tpu" else None, "n_processes": n_processes}


def toolchain_versions(backend: str | None = None) -> dict:
    """What else decides a step's speed: libtpu, the CUDA plugin, runtime, driver and cuDNN, and XLA flags.

    ``xla_flags`` is what the user set in XLA_FLAGS; ``xla_flags_added`` what
    jaxscale added itself (the CPU's virtual device count), which only the CPU
    backend reads. The CUDA plugin is asked for its libraries' versions on a
    GPU backend only (elsewhere loading them would only print that no GPU is there).
    """
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


def require_libtpu() -> None:
    if libtpu_version() is None:
        raise TargetError("planning for a TPU needs the TPU compiler, which is not installed: "
                          "pip install 'jaxscale[tpu]' (or pip install 'jax[tpu]')")


def require_compiler(target: Target) -> None:
    """A TargetError saying what to install when the target's compiler is missing."""
    if target.platform == "tpu":
        require_libtpu()
    elif cuda_plugin_version() is None:
        raise TargetError(f"planning for {target.generation.upper()} GPUs needs XLA's GPU compiler, which is not "
                          "installed: pip install 'jaxscale[gpu-plan]' (or pip install jax-cuda12-plugin "
                          "jax-cuda12-pjrt matching your jax)")


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


def quiet_plugins() -> None:
    """Keep compile-only plugins from changing a run where their hardware is absent.

    The CUDA plugin (installed to plan for GPUs) on a machine with no NVIDIA
    driver would make JAX try CUDA at start-up and print that it cannot load
    it; there, unless JAX_PLATFORMS says otherwise, JAX is told to use the TPU
    (where its device files are) and the CPU. JAX reads JAX_PLATFORMS when it
    is imported, so this comes first, and call it before anything imports JAX.
    libtpu: see quiet_tpu_runtime (which imports JAX to look for TPU chips).
    """
    nvidia = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version"))
    if cuda_plugin_version() is not None and not os.environ.get("JAX_PLATFORMS") and not nvidia:
        tpu = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
        os.environ["JAX_PLATFORMS"] = "tpu,cpu" if libtpu_version() and tpu else "cpu"
    quiet_tpu_runtime()


def _tpu_chips_attached() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # an internal helper: when it moves, fall back to the device files
        return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


@functools.lru_cache(maxsize=32)
def slice_devices(topology: str) -> tuple:
    """The compile-only devices of a TPU topology or a GPU cluster (cached: each load costs time)."""
    from jax.experimental import topologies

    generation, shape = topology.split(":")
    if generation in GPU_TARGETS:
        hosts, per_host = shape.split("x")
        return tuple(topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGETS[generation],
                                                  topology=f"1x{hosts}x{per_host}").devices)
    require_libtpu()
    quiet_tpu_runtime()
    return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


@contextlib.contextmanager
def deviceless_cudnn(devices):
    """Let JAX trace cuDNN fused attention for compile-only GPU devices on a machine without cuDNN.

    ``jax.nn.dot_product_attention(implementation="cudnn")`` asks the local cuDNN
    library for its version while tracing, which a plan (the CUDA plugin only, no
    CUDA libraries) does not have. Inside this context, where that query fails, the
    version is the one the devices' target description names (dnn_version_info,
    9.8.0), which XLA's GPU compiler also compiles for. Where cuDNN answers, on
    other platforms, and with a JAX without that helper, nothing changes.

    Args:
      devices: the devices a step compiles for (a target's, or the local ones).
    """
    if devices[0].platform.lower() not in ("gpu", "cuda"):
        yield
        return
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
        original = fused.check_cudnn_version
    except (ImportError, AttributeError):
        yield
        return
    kind = devices[0].device_kind
    config = next((c for c in GPU_TARGETS.values() if f'"{kind}"' in c), "")

    def version():
        try:
            return original()
        except RuntimeError:  # no cuDNN on this machine
            m = re.search(r"dnn_version_info \{ major: (\d+) minor: (\d+) patch: (\d+)", config)
            return int(m.group(1)) * 10000 + int(m.group(2)) * 100 + int(m.group(3)) if m else 90800

    fused.check_cudnn_version = version
    try:
        yield
    finally:
        fused.check_cudnn_version = original

