"""Where a point runs: in this process, in a worker process (workers.py), or nowhere (compile-only).

Every runtime offers the sweep loop one interface: ``device_count``,
``process_count``, ``lead`` (this process records the rows), ``describe``,
``columns``, ``peak``, ``memory``, ``allocator``, ``isolation``, and
``broadcast``, ``measure(point, index, trace_dir) -> row``, ``should_stop``,
``close``. Rows come from measure.py whichever runtime runs the point.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxscale import devices
from jaxscale.config import Profile
from jaxscale.grid import Point
from jaxscale.measure import measure_point, planned_row
from jaxscale.memory import MemoryBudget, allocator_in_process, memory_budget
from jaxscale.roofline import Efficiency
from jaxscale.targets import Target, runtime_columns, slice_devices


class InProcess:
    """Isolation ``none``: every point is measured in this process (which may be one of several hosts).

    The interface every runtime offers the sweep loop; workers.WorkerRuntime and CompileOnly are the others.
    """

    isolation = "none"

    def __init__(self, profile: Profile):
        allocator = allocator_in_process(profile.run.max_memory_fraction)  # before the backend starts
        self.profile = profile
        self.device_count, self.process_count = jax.device_count(), jax.process_count()
        self.lead = jax.process_index() == 0
        self.describe, self.columns = devices.describe(), runtime_columns()
        self.peak = devices.resolve_peak(profile.run.dtype)
        self.memory = memory_budget(self.peak, profile.run.max_memory_fraction, allocator.memory_fraction)
        self.allocator = allocator

    def broadcast(self, values: list[int]) -> list[int]:
        """Process 0's values, on every process."""
        if self.process_count == 1:
            return list(values)
        from jax.experimental import multihost_utils

        return [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, dtype=np.int32))]

    def measure(self, point: Point, index: int, trace_dir: Path | None) -> dict:
        row = measure_point(point, self.profile, self.peak, self.columns, trace_dir, self.memory)
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


class CompileOnly:
    """Isolation ``compile-only``: every point is compiled for a target's slice and predicted, never run.

    ``efficiency`` (η_c, η_m) is used for every point measured after it is set
    (roofline.default_efficiency of the chip while None). ``figures`` holds
    each planned point's prediction.ProgramFigures by index, so a calibration
    can predict it again.
    """

    isolation = "compile-only"

    def __init__(self, profile: Profile, target: Target, efficiency: Efficiency | None = None):
        first = slice_devices(target.name)[0]
        self.profile, self.target, self.efficiency = profile, target, efficiency
        self.device_count, self.process_count, self.lead = target.n_chips, 1, True
        self.columns = runtime_columns(target, first.device_kind,
                                       len({d.process_index for d in slice_devices(target.name)}))
        self.describe = {"topology": target.name}
        self.peak = devices.spec_peak(first.device_kind, target.platform, profile.run.dtype)
        hbm = self.peak.memory_bytes if self.peak else None
        self.memory = MemoryBudget(int(hbm * profile.run.max_memory_fraction) if hbm else None, hbm, None,
                                   "the chip's HBM (datasheet)")
        self.allocator = None  # nothing is allocated: there is no allocator to set up
        self.figures: dict[int, object] = {}

    def broadcast(self, values: list[int]) -> list[int]:
        return list(values)

    def measure(self, point: Point, index: int, trace_dir: Path | None) -> dict:
        row, self.figures[index] = planned_row(point, self.profile, self.target, self.efficiency)
        return row

    def should_stop(self, index: int, stop: bool) -> bool:
        return stop

    def close(self) -> None:
        pass
