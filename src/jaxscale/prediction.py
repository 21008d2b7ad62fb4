"""What a compiled step's optimized HLO predicts: row columns computed without running it.

- ``predict_comm``: the step's collectives and their time over the link of
  each mesh axis they span (devices.mesh_axis_links).
- ``program_figures``: the HLO's FLOPs, HBM bytes and kernels
  (hlo_cost.program_stats), and the roofline terms of its schedule (roofline.py).
- ``hidden_flops``: FLOPs of fused attention kernels (cuDNN, Pallas) that
  XLA's cost analysis does not count.
- ``predict_step``: the headline terms of a schedule on a chip.

Measured rows carry these columns beside their timings, planned rows instead of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxscale import hlo, hlo_cost, roofline
from jaxscale.comms import collective_axes, count_collectives
from jaxscale.devices import mesh_axis_links


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The headline terms of a predicted step, seconds; None where a figure is missing."""

    compute_s: float | None
    memory_s: float | None
    comm_s: float | None
    step_time_s: float | None
    mfu: float | None

    def columns(self) -> dict:
        return {"predicted_compute_s": self.compute_s, "predicted_memory_s": self.memory_s,
                "predicted_comm_s": self.comm_s, "predicted_step_time_s": self.step_time_s,
                "predicted_mfu": self.mfu}


def predict_step(schedule: roofline.Schedule, peak_tflops: float, hbm_gbytes_per_s: float,
                 model_flops: float | None, n_chips: int,
                 efficiency: roofline.Efficiency = roofline.Efficiency()) -> Prediction:
    """The roofline model's step for a compiled program's schedule (roofline.Schedule.from_hlo).

    Args:
      schedule: the program's kernels and collectives in schedule order.
      peak_tflops, hbm_gbytes_per_s: the chip's peak and memory bandwidth.
      model_flops: analytic model FLOPs per step over all chips (for MFU).
      n_chips: chips of the mesh.
      efficiency: η_c and η_m.
    """
    t = schedule.predict(peak_tflops * 1e12, hbm_gbytes_per_s * 1e9, efficiency)
    mfu = model_flops / (t.step_s * n_chips * peak_tflops * 1e12) if t.step_s and model_flops else None
    return Prediction(t.compute_s, t.memory_s, t.comm_s, t.step_s, mfu)


@dataclasses.dataclass(frozen=True)
class ProgramFigures:
    """What the optimized HLO says of one step, as row columns, and the schedule they came from.

    Attributes:
      stats: hlo_cost.ProgramStats of the per-device program.
      schedule: its roofline.Schedule (re-predicted by a calibration).
      columns: the row's counting and predicted columns (xla_flops_per_step,
        custom_call_flops_per_step, xla_bytes_accessed_per_device, kernels_per_step,
        arithmetic_intensity, ridge_point, bound, predicted_*, roofline_*).
      note: why a figure is empty, or how custom kernels were counted.
    """

    stats: Any
    schedule: Any
    columns: dict
    note: str


def program_figures(hlo_text: str, comm: CommPrediction, peak_tflops: float | None, hbm_gbytes_per_s: float | None,
                    n_devices: int, model_flops: float | None, efficiency=None) -> ProgramFigures:
    """Counts and the roofline prediction of a per-device program (shared by measured and planned rows).

    ``xla_flops_per_step`` is left empty, with the reason in the note, where the
    count cannot be trusted (a loop whose trip count cannot be read, a kernel
    whose FLOPs cannot be counted): never a wrong number.
    """
    module = hlo.parse(hlo_text)
    stats = hlo_cost.program_stats(module, n_devices)
    schedule = roofline.Schedule.from_hlo(module, comm.seconds_of)
    efficiency = efficiency or roofline.Efficiency()
    cols: dict = {"xla_flops_per_step": stats.flops * n_devices if stats.flops_trusted else None,
                  "custom_call_flops_per_step": stats.attention_flops * n_devices,
                  "xla_bytes_accessed_per_device": stats.hbm_bytes, "kernels_per_step": stats.kernels,
                  "predicted_comm_s": comm.seconds}
    notes = []
    if not stats.flops_trusted:
        notes.append(f"xla_flops_per_step left empty: {stats.flops_note}")
    elif stats.counted_kernels:
        notes.append(f"xla_flops_per_step includes {stats.flops_note}")
    if stats.flops_trusted and stats.hbm_bytes:
        cols["arithmetic_intensity"] = stats.flops / stats.hbm_bytes
    if peak_tflops and hbm_gbytes_per_s:
        cols["ridge_point"] = peak_tflops * 1e12 / (hbm_gbytes_per_s * 1e9)
        if comm.seconds is not None:
            t = schedule.predict(peak_tflops * 1e12, hbm_gbytes_per_s * 1e9, efficiency)
            cols.update(t.columns(), bound=t.bound, roofline_eta_compute=efficiency.compute,
                        roofline_eta_memory=efficiency.memory, roofline_efficiency=efficiency.source)
            if model_flops and t.step_s:
                cols["predicted_mfu"] = model_flops / (t.step_s * n_devices * peak_tflops * 1e12)
    return ProgramFigures(stats, schedule, cols, "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class HiddenFlops:
    """FLOPs of the fused attention kernels (cuDNN, Pallas), which XLA's cost analysis does not see, per device
    per step."""

    flops_per_device: int
    calls: int
    note: str


def hidden_flops(hlo_text: str) -> HiddenFlops:
    """FLOPs of the fused attention kernels of a per-device HLO module, from their shapes (hlo_cost.program_stats).

    XLA's cost analysis counts none of them; hlo_cost.loop_corrected_cost leaves them out
    too, so that its FLOPs plus these are the whole step.
    """
    module = hlo.parse(hlo_text)
    stats = hlo_cost.program_stats(module)
    calls = sum(module.multiplicity.get(k.computation, 0) for items in hlo_cost.kernels(module).values()
                for k in items if k.attention)
    notes = []
    if stats.attention_flops:
        notes.append(f"xla_flops_per_step includes {stats.attention_flops:.4g} FLOPs per device of {calls} fused "
                     "attention kernels that XLA's cost analysis does not count, from their shapes")
    if stats.opaque_kernels:
        notes.append(f"custom-call kernels whose FLOPs cannot be counted: {', '.join(stats.opaque_kernels)}; "
                     "xla_flops_per_step left empty")
    return HiddenFlops(int(stats.attention_flops), calls, "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class CommPrediction:
    """Collectives of a step and their predicted time per mesh axis."""

    collectives: Any
    links: dict
    traffic_bytes: dict  # axis name -> ring traffic bytes per device
    seconds_by_axis: dict  # axis name -> seconds, None where the link has no figure
    seconds: float | None
    note: str
    per_collective: dict = dataclasses.field(default_factory=dict)  # key -> (seconds of one execution, axis)

    def seconds_of(self, key: str) -> tuple[float, str]:
        """(seconds of one execution, the axis it runs on) of a collective, by channel id or instruction name."""
        return self.per_collective.get(key, (0.0, ""))

    def axis_columns(self) -> dict:
        out = {}
        for axis in ("data", "model"):
            link = self.links.get(axis)
            out[f"comm_link_{axis}"] = link.label if link else None
            out[f"comm_link_{axis}_gbytes_per_s"] = link.gbytes_per_s if link else None
            out[f"collective_traffic_{axis}_bytes"] = int(self.traffic_bytes.get(axis, 0)) if link else None
            out[f"predicted_comm_{axis}_s"] = self.seconds_by_axis.get(axis) if link else None
        return out


def predict_comm(hlo_text: str, mesh, peak, torus: tuple[int, ...] | None = None) -> CommPrediction:
    """Collectives of a per-device HLO module and their time over the link of each mesh axis they run on.

    Each collective is attributed to the mesh axes its replica groups span
    (comms.collective_axes); one spanning several axes is charged to the
    slowest of their links. An axis's time is its ring traffic over its link's
    one-way bandwidth (on a TPU, over every torus dimension the axis spans,
    wraparounds included: devices.mesh_axis_links); the step's predicted_comm_s
    is the sum over axes (every collective in full, none overlapping another).

    Args:
      hlo_text: optimized HLO of the per-device program.
      mesh: a jax Mesh, or an array of devices (one axis named ``data``).
      peak: a devices.PeakInfo (its platform and links), or None.
      torus: a TPU slice's shape (default: read off the mesh devices' coordinates).
    """
    if hasattr(mesh, "axis_names"):
        grid, names = np.asarray(mesh.devices, dtype=object), tuple(mesh.axis_names)
    else:
        grid = np.asarray(mesh, dtype=object).reshape(-1)
        names = ("data",)
    collectives = count_collectives(hlo_text, grid.size)
    platform = (peak.platform if peak and peak.platform else getattr(grid.flat[0], "platform", "cpu"))
    links = mesh_axis_links(grid, names, platform, peak.local_link if peak else None,
                                    peak.remote_link if peak else None, torus)
    traffic = {name: 0.0 for name in names}
    per_collective = {}
    for c in collectives.items:
        axes = collective_axes([list(g) for g in c.groups], grid.shape)
        if not axes or not c.traffic_bytes:
            continue
        slowest = names[min(axes, key=lambda a: links[names[a]].gbytes_per_s or 0.0)]
        traffic[slowest] += c.traffic_bytes
        bw = links[slowest].gbytes_per_s
        per_collective[c.channel or c.name] = (c.full_bytes * c.ring_factor / (bw * 1e9) if bw else 0.0, slowest)
    seconds = {}
    for name in names:
        bw = links[name].gbytes_per_s
        seconds[name] = 0.0 if traffic[name] == 0 else (traffic[name] / (bw * 1e9) if bw else None)
    missing = [f"{n} ({links[n].label})" for n in names if seconds[n] is None]
    note = ""
    if missing:
        note = f"no bandwidth figure for the link of mesh axis {', '.join(missing)}: predicted_comm_s left empty"
    if collectives.unknown_trip_counts:
        note = "; ".join(filter(None, [note, f"{collectives.unknown_trip_counts} loop(s) with no readable trip "
                                              "count: their collectives were counted once"]))
    total = None if missing else float(sum(seconds.values()))
    return CommPrediction(collectives, links, traffic, seconds, total, note, per_collective)


