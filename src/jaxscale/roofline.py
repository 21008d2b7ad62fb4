"""A step's predicted time from its scheduled kernels: a per-op roofline plus exposed communication.

Each kernel of the optimized HLO (hlo_cost.kernels, in schedule order, loop bodies
weighted by their trips) takes

    t_i = max(flops_i / (η_c · peak FLOP/s), hbm_bytes_i / (η_m · HBM bandwidth))

since a kernel is bound by its slower resource and kernels run one after
another: a matmul is compute-bound and the elementwise work around it
memory-bound, so ``max(Σ compute, Σ memory)`` would let one hide the other.

Collectives run on the links while kernels run on the chip. Each collective
takes its ring traffic over the link of the mesh axes it spans (prediction.predict_comm)
and the model walks each computation's schedule on two clocks, the chip's and
each link's:

- a synchronous collective starts when the chip reaches it (and its link is
  free) and the chip waits for it: charged in full;
- an async collective (``*-start`` … ``*-done``, an async-wrapped collective,
  the TPU's collective-matmul fusions) starts at its start and the chip waits at
  its done only for what is left: charged only for the time it outlasts the
  kernels scheduled between them. One that starts at the end of a loop body and
  is waited for in the next trip overlaps the kernels on both sides of the back
  edge. Collectives on one link queue behind each other.

``step_s`` is that walk; ``roofline_s`` the kernels alone (Σ t_i);
``exposed_comm_s = step_s − roofline_s``; ``comm_s`` every collective in full.
The fully overlapped bound is ``max(roofline_s, comm_s)``, the fully exposed one
``roofline_s + comm_s``. ``bound`` names the largest of the time spent in
compute-bound kernels, in memory-bound kernels, and in exposed communication.

η_c and η_m default to 1 (the datasheet roofline); ``calibrate`` fits them to
measured steps of one chip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from jaxscale import chips, hlo, hlo_cost


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peak and bandwidth kernels reach, and where they come from.

    Attributes:
      compute: η_c, of peak FLOP/s.
      memory: η_m, of HBM bandwidth.
      source: ``datasheet`` (both 1), or what they were fitted to.
    """

    compute: float = 1.0
    memory: float = 1.0
    source: str = "datasheet"

    def __post_init__(self):
        for name in ("compute", "memory"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1.5 and math.isfinite(value)):
                raise ValueError(f"efficiency {name} = {value!r}: expected a fraction of the datasheet figure "
                                 "in (0, 1.5]")


def default_efficiency(device_kind: str) -> Efficiency:
    """The part's measured practical efficiencies (chips.PRACTICAL) where jaxscale has them, else the datasheet's."""
    chip = chips.chip_for_kind(device_kind)
    practical = chips.PRACTICAL.get(chip.key) if chip else None
    if practical is None:
        return Efficiency()
    compute, memory, how = practical
    return Efficiency(compute, memory, f"{chip.name} practical: {how}")


@dataclasses.dataclass(frozen=True)
class StepTime:
    """The predicted step and its terms, seconds per step.

    Attributes:
      step_s: the schedule walk: kernels plus the communication they do not hide.
      roofline_s: Σ over kernels of max(compute, memory).
      compute_s: Σ flops_i / (η_c·peak) over kernels (the compute term alone).
      memory_s: Σ bytes_i / (η_m·bandwidth) over kernels (the memory term alone).
      compute_bound_s, memory_bound_s: the roofline split by which term bounds each kernel.
      comm_s: every collective in full.
      exposed_comm_s: step_s − roofline_s.
      overlapped_s, exposed_s: the fully overlapped and fully exposed bounds.
      bound: ``compute``, ``memory`` or ``communication``, the largest of compute_bound_s,
        memory_bound_s and exposed_comm_s.
    """

    step_s: float
    roofline_s: float
    compute_s: float
    memory_s: float
    compute_bound_s: float
    memory_bound_s: float
    comm_s: float
    exposed_comm_s: float
    overlapped_s: float
    exposed_s: float
    bound: str

    def columns(self) -> dict:
        return {"predicted_step_time_s": self.step_s, "predicted_roofline_s": self.roofline_s,
                "predicted_compute_s": self.compute_s, "predicted_memory_s": self.memory_s,
                "predicted_compute_bound_s": self.compute_bound_s, "predicted_memory_bound_s": self.memory_bound_s,
                "predicted_comm_s": self.comm_s, "predicted_exposed_comm_s": self.exposed_comm_s,
                "predicted_overlapped_step_s": self.overlapped_s, "predicted_exposed_step_s": self.exposed_s}


@dataclasses.dataclass
class _Time:
    """Running sums of one walk (one run of a computation)."""

    wall: float = 0.0
    compute: float = 0.0
    memory: float = 0.0
    compute_bound: float = 0.0
    memory_bound: float = 0.0
    comm: float = 0.0

    def add(self, other: "_Time", times: float) -> None:
        self.wall += times * other.wall
        self.compute += times * other.compute
        self.memory += times * other.memory
        self.compute_bound += times * other.compute_bound
        self.memory_bound += times * other.memory_bound
        self.comm += times * other.comm


@dataclasses.dataclass(frozen=True)
class Op:
    """One scheduled kernel, reduced to what the model needs.

    kind: ``compute``, ``segment`` (consecutive compute kernels: ``flops`` and ``hbm_bytes``
    are arrays), ``collective`` (synchronous), ``start``/``done`` (an async
    collective), ``loop`` (``subs``: its body and condition, run ``trips`` times
    each) or ``branch`` (a conditional or call: the slowest of ``subs`` runs once).
    """

    kind: str
    flops: float | np.ndarray = 0.0
    hbm_bytes: float | np.ndarray = 0.0
    channel: str = ""
    seconds: float = 0.0
    link: str = ""
    subs: tuple[str, ...] = ()
    trips: int = 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The kernels of a per-device program in schedule order, per computation; cheap to re-predict
    for other efficiencies (a calibration evaluates it many times)."""

    computations: dict
    entry: str
    kernels: int

    @classmethod
    def from_hlo(cls, hlo_text: str | hlo.HloModule,
                 collective_seconds: Callable[[str], tuple[float, str]] | None = None) -> "Schedule":
        """Args:
          hlo_text: optimized HLO (text or parsed).
          collective_seconds: ``key -> (seconds of one execution, link)`` for a collective kernel,
            its key the collective's channel id or instruction name (prediction.predict_comm gives
            one); None: collectives take no time.
        """
        module = hlo.parse(hlo_text)
        per_comp = hlo_cost.kernels(module)
        out, launches = {}, 0
        for comp, items in per_comp.items():
            insts = module.computations[comp]
            ops = []
            for k in items:
                inst = insts[k.position]
                if k.kind == "compute":
                    ops.append(Op("compute", float(k.flops), float(k.hbm_bytes)))
                    launches += module.multiplicity.get(comp, 0)
                elif k.kind == "loop":
                    subs = tuple(c for c in (inst.attr("body"), inst.attr("condition")) if c in per_comp)
                    ops.append(Op("loop", subs=subs, trips=module.trip_count(inst) or 1))
                elif k.kind == "call":
                    ops.append(Op("branch", subs=tuple(c for c in _branches(inst) if c in per_comp)))
                elif k.kind in ("collective", "collective-start", "collective-done"):
                    seconds, link = collective_seconds(k.channel) if collective_seconds else (0.0, "")
                    kind = {"collective": "collective", "collective-start": "start", "collective-done": "done"}[k.kind]
                    ops.append(Op(kind, channel=k.channel, seconds=seconds, link=link))
                    if kind != "done":
                        launches += module.multiplicity.get(comp, 0)
            out[comp] = tuple(_segments(ops))
        return cls(out, module.entry, launches)

    def predict(self, peak_flops: float, hbm_bytes_per_s: float, efficiency: Efficiency = Efficiency()) -> StepTime:
        """The step's terms at a peak (FLOP/s, in the math mode of the run's matmuls), an HBM
        bandwidth (bytes/s) and efficiencies η_c, η_m."""
        rate_c = efficiency.compute * peak_flops
        rate_m = efficiency.memory * hbm_bytes_per_s
        memo: dict[str, _Time] = {}

        def walk(comp: str, stack: tuple = ()) -> _Time:
            if comp in memo:
                return memo[comp]
            if comp in stack or comp not in self.computations:
                return _Time()
            total = _Time()
            link_free: dict[str, float] = {}
            in_flight: dict[str, tuple[float, float]] = {}  # channel -> (start wall time, end time)
            waited_early: dict[str, float] = {}  # channel -> wall time of a done met before its start
            for op in self.computations[comp]:
                if op.kind == "segment":  # consecutive kernels, as arrays
                    c, m = op.flops / rate_c, op.hbm_bytes / rate_m
                    total.wall += float(np.maximum(c, m).sum())
                    total.compute += float(c.sum())
                    total.memory += float(m.sum())
                    total.compute_bound += float(np.where(c >= m, c, 0.0).sum())
                    total.memory_bound += float(np.where(c < m, m, 0.0).sum())
                elif op.kind == "loop":
                    for sub in op.subs:
                        total.add(walk(sub, stack + (comp,)), op.trips)
                elif op.kind == "branch":
                    if op.subs:  # a conditional runs one branch: the slowest, an upper bound
                        total.add(max((walk(c, stack + (comp,)) for c in op.subs), key=lambda t: t.wall), 1)
                elif op.kind in ("collective", "start"):
                    begin = max(total.wall, link_free.get(op.link, 0.0))
                    end = begin + op.seconds
                    link_free[op.link] = end
                    total.comm += op.seconds
                    if op.kind == "collective":
                        total.wall = end
                    else:
                        in_flight[op.channel] = (total.wall, end)
                elif op.kind == "done":
                    if op.channel in in_flight:
                        total.wall = max(total.wall, in_flight.pop(op.channel)[1])
                    else:
                        waited_early[op.channel] = total.wall
            # A collective started late in a loop body and waited for early in the next trip overlaps
            # the kernels after its start and before its done; one never waited for here is charged in full.
            for channel, (start, end) in in_flight.items():
                if channel in waited_early:
                    total.wall += max(0.0, (end - start) - ((total.wall - start) + waited_early[channel]))
                else:
                    total.wall += end - start
            memo[comp] = total
            return total

        t = walk(self.entry) if self.entry else _Time()
        roofline = t.compute_bound + t.memory_bound
        exposed = max(t.wall - roofline, 0.0)
        terms = {"compute": t.compute_bound, "memory": t.memory_bound, "communication": exposed}
        bound = max(terms, key=terms.get) if any(terms.values()) else "compute"
        return StepTime(step_s=roofline + exposed, roofline_s=roofline, compute_s=t.compute, memory_s=t.memory,
                        compute_bound_s=t.compute_bound, memory_bound_s=t.memory_bound, comm_s=t.comm,
                        exposed_comm_s=exposed, overlapped_s=max(roofline, t.comm), exposed_s=roofline + t.comm,
                        bound=bound)


def _segments(ops: list) -> list:
    """Runs of consecutive compute kernels as one ``segment`` op holding their FLOPs and bytes as arrays."""
    out, run = [], []
    for op in ops + [None]:
        if op is not None and op.kind == "compute":
            run.append(op)
            continue
        if run:
            out.append(Op("segment", np.array([o.flops for o in run]), np.array([o.hbm_bytes for o in run])))
            run = []
        if op is not None:
            out.append(op)
    return out


def predict(hlo_text: str | hlo.HloModule, peak_flops: float, hbm_bytes_per_s: float,
            collective_seconds: Callable[[str], tuple[float, str]] | None = None,
            efficiency: Efficiency = Efficiency()) -> StepTime:
    """The per-op roofline step time of a per-device program (Schedule.from_hlo, then predict)."""
    return Schedule.from_hlo(hlo_text, collective_seconds).predict(peak_flops, hbm_bytes_per_s, efficiency)


def _branches(inst: hlo.Instruction) -> list[str]:
    out = []
    for attr, value in hlo.CALL_ATTRS.findall(inst.attrs):
        if attr in ("true_computation", "false_computation", "branch_computations", "to_apply"):
            out += re.findall(r"[\w.\-]+", value.replace("%", " "))
    return out


# ----------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured step to calibrate against: its program's terms at given efficiencies, and its time.

    ``terms(efficiency) -> (compute_bound_s, memory_bound_s, exposed_comm_s)``; a Schedule gives
    them by walking it (``Sample.of_schedule``), a measured row by its predicted columns
    (``Sample.of_terms``).
    """

    terms: Callable[[Efficiency], tuple[float, float, float]]
    measured_s: float
    label: str = ""

    @classmethod
    def of_schedule(cls, schedule: Schedule, peak_flops: float, hbm_bytes_per_s: float, measured_s: float,
                    label: str = "") -> "Sample":
        def terms(e: Efficiency) -> tuple[float, float, float]:
            t = schedule.predict(peak_flops, hbm_bytes_per_s, e)
            return t.compute_bound_s, t.memory_bound_s, t.exposed_comm_s

        return cls(terms, measured_s, label)

    @classmethod
    def of_terms(cls, compute_bound_s: float, memory_bound_s: float, exposed_comm_s: float, used: Efficiency,
                 measured_s: float, label: str = "") -> "Sample":
        """From a row's predicted terms at the efficiencies ``used`` (each kernel keeps its bound)."""
        a, b = compute_bound_s * used.compute, memory_bound_s * used.memory

        def terms(e: Efficiency) -> tuple[float, float, float]:
            return a / e.compute, b / e.memory, exposed_comm_s

        return cls(terms, measured_s, label)


_BOUNDS = (0.02, 1.5)


def fit_efficiency(samples: list[Sample], source: str) -> Efficiency:
    """η_c and η_m that make the model's steps match measured ones (least squares on log step time).

    With one step, or steps whose compute-bound and memory-bound shares are too alike to tell
    the two apart (the fit's Jacobian is near singular), one common factor scales both
    (η_c = η_m); otherwise both are fitted, by a grid search on log η that narrows around
    its best point from the common-factor solution (each kernel's bound moves with the
    efficiencies, so the problem is piecewise, not linear).
    """
    if not samples:
        raise ValueError("no measured steps to calibrate against")
    lo, hi = _BOUNDS

    def scale(ratio: float) -> float:
        """The least-squares common factor of (η_c, η_m) = (f·ratio, f) (bisection on log f: the
        steps fall as f grows)."""
        def residual(f: float) -> float:
            e = Efficiency(min(max(f * ratio, lo), hi), min(max(f, lo), hi), source)
            return sum(math.log(sum(s.terms(e)) / s.measured_s) for s in samples)

        a, b = lo / max(ratio, 1), hi / max(ratio, 1)
        if residual(b) > 0:
            return b
        if residual(a) < 0:
            return a
        for _ in range(50):
            mid = math.sqrt(a * b)
            a, b = (mid, b) if residual(mid) > 0 else (a, mid)
        return math.sqrt(a * b)

    f = scale(1.0)
    common = Efficiency(f, f, source + "; one factor for compute and memory")
    if len(samples) == 1:
        return common
    # Without communication every step scales as 1/f at a fixed ratio ρ = η_c/η_m, so the best f at a ρ
    # has a closed form and the fit is a search over ρ alone: a grid, then a golden-section refinement.
    base = Efficiency(1.0, 1.0)

    def spread(log_ratio: float) -> float:
        r = math.exp(log_ratio)
        e = Efficiency(min(max(r, lo), hi), 1.0) if r <= 1 else Efficiency(1.0, min(max(1 / r, lo), hi))
        d = [math.log(sum(s.terms(e)) / s.measured_s) for s in samples]
        mean = sum(d) / len(d)
        return sum((x - mean) ** 2 for x in d)

    del base
    grid = np.linspace(math.log(lo / hi), math.log(hi / lo), 241)
    values = [spread(x) for x in grid]
    k = int(np.argmin(values))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        x1, x2 = b - golden * (b - a), a + golden * (b - a)
        if spread(x1) < spread(x2):
            b = x2
        else:
            a = x1
    ratio = math.exp((a + b) / 2)
    f = scale(ratio)
    fitted = Efficiency(min(max(f * ratio, lo), hi), min(max(f, lo), hi), source)
    jacobian = []
    for s in samples:
        cb, mb, exposed = s.terms(fitted)
        total = cb + mb + exposed
        jacobian.append([cb / total, mb / total])
    if np.linalg.matrix_rank(np.array(jacobian), tol=1e-6) < 2 or np.linalg.cond(np.array(jacobian)) > 1e3:
        return common
    return fitted
