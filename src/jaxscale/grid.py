"""A profile → the ordered list of grid points, dropping those that cannot be formed."""

from __future__ import annotations

import collections
import dataclasses

from jaxscale.config import ModelSpec, Profile, ProfileError, data_axis_size


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: a model size run with one strategy on one device count.

    ``remat`` (a config.REMAT_POLICIES name) and ``xla_flags`` (a flag set, ""
    for XLA's defaults) are grid axes too.
    """

    model: ModelSpec
    strategy: str
    n_devices: int
    data_axis: int
    model_axis: int
    global_batch: int
    batch_mode: str
    remat: str = "none"
    xla_flags: str = ""

    @property
    def mesh_shape(self) -> str:
        return f"data:{self.data_axis},model:{self.model_axis}"

    @property
    def key(self) -> tuple:
        """Identity of the point for resuming: every grid parameter, nothing measured."""
        m = self.model
        return (self.strategy, self.n_devices, self.mesh_shape, m.d_model, m.n_layers, m.n_heads, m.d_ff,
                m.seq_len, m.vocab, self.global_batch, self.remat, self.xla_flags)

    def describe(self) -> str:
        extra = "" if self.remat == "none" else f" remat={self.remat}"
        if self.xla_flags:
            extra += f" flags={self.xla_flags}"
        return f"{self.model.size_name} {self.strategy} n={self.n_devices} b={self.global_batch}{extra}"

    def grid_columns(self) -> dict:
        m = self.model
        return {
            "size_name": m.size_name, "strategy": self.strategy, "n_devices": self.n_devices,
            "mesh_shape": self.mesh_shape, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "d_ff": m.d_ff, "seq_len": m.seq_len, "vocab": m.vocab, "global_batch": self.global_batch,
            "batch_mode": self.batch_mode, "remat": self.remat, "xla_flags": self.xla_flags,
        }


GRID_COLUMNS = ("size_name", "strategy", "n_devices", "mesh_shape", "d_model", "n_layers", "n_heads", "d_ff",
                "seq_len", "vocab", "global_batch", "batch_mode", "remat", "xla_flags")
KEY_COLUMNS = ("strategy", "n_devices", "mesh_shape", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab",
               "global_batch", "remat", "xla_flags")
# Key columns that are text (the rest are integers).
TEXT_KEY_COLUMNS = ("strategy", "mesh_shape", "remat", "xla_flags")


def why_infeasible(model: ModelSpec, strategy: str, n: int, model_axis: int, n_processes: int) -> str | None:
    """The reason a (model, strategy, device count) point cannot be formed, or None."""
    if n % n_processes:
        return f"{n} devices is not a multiple of the {n_processes} processes"
    if strategy == "fsdp_tp":
        if n % model_axis:
            return f"fsdp_tp needs a device count that is a multiple of model_axis={model_axis}"
    tp = {"tp": n, "fsdp_tp": model_axis}.get(strategy, 1)
    if tp > 1:
        for name in ("n_heads", "d_ff", "vocab"):
            if getattr(model, name) % tp:
                return f"{strategy} splits {name}={getattr(model, name)} over a model axis of {tp}, which does not divide it"
    fsdp = {"fsdp": n, "fsdp_tp": n // model_axis}.get(strategy, 1)
    if fsdp > 1 and model.d_model % fsdp:
        return f"{strategy} shards d_model={model.d_model} over a data axis of {fsdp}, which does not divide it"
    return None


def grid_size(profile: Profile, devices: tuple[int, ...] | None = None) -> int:
    """The number of points a profile's lists make before any is dropped (over ``devices``, default the profile's)."""
    devices = profile.mesh.devices if devices is None else devices
    per_count = len(profile.models) * len(profile.mesh.strategies) * len(profile.run.remat) * len(profile.run.xla_flags)
    return sum(per_count * len(profile.batch.globals_for(n)) for n in devices)


def build_grid(profile: Profile, n_available: int, n_processes: int = 1) -> tuple[list[Point], collections.Counter]:
    """Expand a profile into points, in a fixed order (size, device count, strategy, batch, remat, flags).

    Args:
      profile: a validated profile.
      n_available: global device count of the runtime.
      n_processes: JAX process count; a mesh takes as many devices from each.

    Returns:
      (points, dropped), dropped counting the reasons of the points left out.

    Raises:
      ProfileError: a device count above what exists, or an empty grid.
    """
    too_many = [n for n in profile.mesh.devices if n > n_available]
    if too_many:
        raise ProfileError(f"{profile.source}: [mesh] devices = {list(profile.mesh.devices)}: {too_many} exceed the "
                           f"{n_available} devices that exist here; use counts up to {n_available} "
                           f"(--set mesh.devices=[...])")
    points, dropped = [], collections.Counter()
    model_axis = profile.mesh.model_axis
    # Each (size, count, strategy, batch) stands for one point per remat policy and flag set: a drop counts them all.
    variants = len(profile.run.remat) * len(profile.run.xla_flags)
    for model in profile.models:
        for n in profile.mesh.devices:
            for strategy in profile.mesh.strategies:
                reason = why_infeasible(model, strategy, n, model_axis, n_processes)
                if reason:
                    dropped[reason] += len(profile.batch.globals_for(n)) * variants
                    continue
                data = data_axis_size(strategy, n, model_axis)
                for batch in profile.batch.globals_for(n):
                    if batch % data:
                        dropped[f"a global batch of {batch} does not split over a data axis of {data}"] += variants
                        continue
                    for remat in profile.run.remat:
                        for flags in profile.run.xla_flags:
                            points.append(Point(model=model, strategy=strategy, n_devices=n, data_axis=data,
                                                model_axis=n // data, global_batch=batch,
                                                batch_mode=profile.batch.mode, remat=remat, xla_flags=flags))
    if not points:
        reasons = "; ".join(f"{r} ({c}x)" for r, c in dropped.items())
        raise ProfileError(f"{profile.source}: the grid is empty after dropping points that cannot be formed: {reasons}")
    return points, dropped


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
    """Whether a point's grid columns hold every value of a selector (never, without one)."""
    if not selector:
        return False
    columns = point.grid_columns()
    return all(str(columns.get(k)) == v for k, v in selector.items())
