"""jaxscale: how does a transformer training step scale?

The public API, imported lazily so that ``jaxscale`` can be imported (and the
CLI can set XLA_FLAGS) before JAX initializes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # profiles and the grid
    "Profile": "jaxscale.config",
    "ModelSpec": "jaxscale.config",
    "ProfileError": "jaxscale.config",
    "load_profile": "jaxscale.config",
    "build_profile": "jaxscale.config",
    "Point": "jaxscale.grid",
    "build_grid": "jaxscale.grid",
    # arithmetic
    "train_flops": "jaxscale.flops",
    "param_count": "jaxscale.flops",
    "mfu": "jaxscale.flops",
    "CHIPS": "jaxscale.chips",
    "DEVICE_KINDS": "jaxscale.chips",
    "device_peak": "jaxscale.chips",
    "matmul_math_mode": "jaxscale.chips",
    "attention_call_flops": "jaxscale.flops",
    # the model and its step
    "Transformer": "jaxscale.model",
    "build_step": "jaxscale.step",
    "compile_step": "jaxscale.step",
    "compile_point": "jaxscale.step",
    "AttentionChoice": "jaxscale.attention",
    "choose_attention": "jaxscale.attention:choose",
    # planning for a target (a TPU slice, a GPU cluster) without its hardware
    "Target": "jaxscale.targets",
    "parse_target": "jaxscale.targets",
    "run_plan": "jaxscale.plan",
    "plan_point": "jaxscale.measure",
    "predict_step": "jaxscale.prediction",
    "loop_corrected_cost": "jaxscale.hlo_cost",
    "program_stats": "jaxscale.hlo_cost",
    "ProgramStats": "jaxscale.hlo_cost",
    "predict_roofline": "jaxscale.roofline:predict",
    "Efficiency": "jaxscale.roofline",
    "fit_efficiency": "jaxscale.roofline",
    # measuring
    "StepProfile": "jaxscale.measure",
    "profile_step": "jaxscale.measure",
    "Timing": "jaxscale.timing",
    "time_pipelined": "jaxscale.timing",
    "count_collectives": "jaxscale.comms",
    "find_collectives": "jaxscale.comms",
    "resolve_peak": "jaxscale.devices",
    "spec_peak": "jaxscale.devices",
    "mesh_axis_links": "jaxscale.devices",
    "calibrate": "jaxscale.devices",
    "run_sweep": "jaxscale.sweep",
    "run_profile": "jaxscale.sweep",
    "read_rows": "jaxscale.records",
    # analysis
    "PowerLawFit": "jaxscale.powerlaw",
    "fit_power_law": "jaxscale.powerlaw",
    "fit_table": "jaxscale.powerlaw",
    "joint_fit": "jaxscale.powerlaw",
    "default_fits": "jaxscale.analyze",
    "scaling_efficiency": "jaxscale.analyze",
    "add_memory_column": "jaxscale.families",
    "parse_expectation": "jaxscale.analyze",
    "check_expectation": "jaxscale.analyze",
    "default_joint_fit": "jaxscale.analyze",
    "grade": "jaxscale.powerlaw",
    "curvature_test": "jaxscale.powerlaw",
    "fit_usl": "jaxscale.usl",
    "usl_table": "jaxscale.usl",
    "predict_table": "jaxscale.analyze",
    "plan_vs_measured": "jaxscale.analyze",
    "Analysis": "jaxscale.analyze",
    "analyze_rows": "jaxscale.analyze",
    "write_report": "jaxscale.report",
    "write_analysis": "jaxscale.report",
    "compare": "jaxscale.comparison:compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")  # "module:attr" where the public name differs
        value = getattr(importlib.import_module(module), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxscale' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from jaxscale.analyze import (Analysis, analyze_rows, check_expectation, default_fits, default_joint_fit,
                                  parse_expectation, plan_vs_measured, predict_table, scaling_efficiency)
    from jaxscale.chips import CHIPS, DEVICE_KINDS, device_peak, matmul_math_mode
    from jaxscale.families import add_memory_column
    from jaxscale.powerlaw import PowerLawFit, curvature_test, fit_power_law, fit_table, grade, joint_fit
    from jaxscale.usl import fit_usl, usl_table
    from jaxscale.comms import count_collectives, find_collectives
    from jaxscale.comparison import compare
    from jaxscale.config import ModelSpec, Profile, ProfileError, build_profile, load_profile
    from jaxscale.devices import calibrate, mesh_axis_links, resolve_peak, spec_peak
    from jaxscale.flops import attention_call_flops, mfu, param_count, train_flops
    from jaxscale.grid import Point, build_grid
    from jaxscale.attention import AttentionChoice
    from jaxscale.attention import choose as choose_attention
    from jaxscale.hlo_cost import ProgramStats, loop_corrected_cost, program_stats
    from jaxscale.roofline import Efficiency, fit_efficiency
    from jaxscale.roofline import predict as predict_roofline
    from jaxscale.measure import StepProfile, plan_point, profile_step
    from jaxscale.model import Transformer
    from jaxscale.plan import run_plan
    from jaxscale.prediction import predict_step
    from jaxscale.records import read_rows
    from jaxscale.report import write_analysis, write_report
    from jaxscale.step import build_step, compile_point, compile_step
    from jaxscale.targets import Target, parse_target
    from jaxscale.sweep import run_profile, run_sweep
    from jaxscale.timing import Timing, time_pipelined
