"""Running the CLI as a user would, in a subprocess."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _fast_compile_flags() -> str:
    """XLA flags under which the CPU backend compiles a test's programs about three times faster.

    LLVM optimization level 0 takes a third off and changes no HLO pass. XLA's legacy CPU fusion emitters
    halve what is left (four d_model=32 train steps: 9.3 s at XLA's defaults, 6.3 s at level 0, 3.0 s with
    the legacy emitters too); they fuse some elementwise ops differently, so FLOPs and bytes differ from a
    default CPU compile by under 1% (0.02% and 0.4% at d_model=64, 2 layers, one device). No test
    compares a figure with one recorded under other flags: each compares figures of programs compiled here with
    each other or with hand counts, and none compares speeds. An XLA that no longer knows the emitters' flag
    (it would abort every process) gets level 0 alone; the check runs once, in the first process, and its
    answer passes to every process the tests start through the environment.
    """
    chosen = os.environ.get("JAXSCALE_TEST_XLA_FLAGS")
    if chosen is None:
        chosen = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
                               env={**os.environ, "XLA_FLAGS": chosen, "JAX_PLATFORMS": "cpu"})
        if probe.returncode != 0:
            chosen = "--xla_backend_optimization_level=0"
        os.environ["JAXSCALE_TEST_XLA_FLAGS"] = chosen
    return chosen


# Every process a test starts gets them, beside the device count it sets or the CLI forces.
FAST_COMPILE_FLAGS = _fast_compile_flags()

TINY_SETS = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.seq_len=8", "model.vocab=64",
             "run.steps=3", "run.warmup=1"]


def cli_env(**extra) -> dict:
    """This environment without the tests' host device count, which the CLI is to force itself."""
    env = {**os.environ, **{k: str(v) for k, v in extra.items()}}
    env["XLA_FLAGS"] = f"{extra.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    return env


def jaxscale(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *map(str, args)], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def sets(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def plant_calibration(cache: Path, n_devices=(8,), dtypes=("float32",)) -> Path:
    """A calibration of the CPU's virtual devices (each count and dtype given) in a cache folder, so that a
    run pointed there (JAXSCALE_CACHE_DIR) measures no peak; the figures are planted, not measured. The file
    is replaced whole, so a process reading it meanwhile never sees half of it."""
    from jaxscale.devices import CALIBRATION_VERSION

    entries = {f"v{CALIBRATION_VERSION}|cpu|cpu|{dtype}|{n}|{socket.gethostname()}": {
        "tflops": 0.01, "hbm_gbytes_per_s": 1.0, "interconnect_gbytes_per_s": 0.5, "size": 1024, "dtype": dtype,
        "n_local_devices": n, "measured_at": "planted"} for n in n_devices for dtype in dtypes}
    path = Path(cache) / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"calibration.json.{os.getpid()}")
    partial.write_text(json.dumps(entries))
    partial.replace(path)
    return path


TINY_MODEL = {"d_model": 64, "n_layers": 1, "n_heads": 8, "d_ff": 128, "seq_len": 16, "vocab": 128}


def step_grid(model=TINY_MODEL, devices=(1, 2, 4, 8), strategies=("dp", "fsdp", "tp", "fsdp_tp"), batch=8, **run):
    """A profile of one model over devices x strategies (model axis 2) and its grid on 8 devices."""
    from jaxscale.config import build_profile
    from jaxscale.grid import build_grid

    profile = build_profile({"run": {"steps": 2, "warmup": 1, **run}, "model": dict(model),
                             "batch": {"global_batch": batch},
                             "mesh": {"devices": list(devices), "strategies": list(strategies), "model_axis": 2}})
    return profile, build_grid(profile, 8)[0]


GEMM_CONFIG = ('backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":'
               '{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["%s"],"rhs_batch_dimensions":[],'
               '"rhs_contracting_dimensions":["0"]},"epilogue":"DEFAULT"}}')

# A cuBLASLt gemm in a 3-trip loop, a Triton gemm fusion, a Pallas kernel with its cost estimate, a
# transcendental and an elementwise op: FLOPs by hand below.
KERNELS = f"""
HloModule m, is_scheduled=true

%triton_gemm (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {{
  %p0 = bf16[64,32]{{1,0}} parameter(0)
  %p1 = bf16[32,16]{{1,0}} parameter(1)
  ROOT %d = bf16[64,16]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%body (p: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {{
  %p = (s32[], bf16[64,32]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[64,32]{{1,0}} get-tuple-element(%p), index=1
  %w = bf16[32,32]{{1,0}} constant({{...}})
  %g = (bf16[64,32]{{1,0}}, s8[4194304]{{0}}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", {GEMM_CONFIG % 1}
  %y = bf16[64,32]{{1,0}} get-tuple-element(%g), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[64,32]{{1,0}}) tuple(%next, %y)
}}

%cond (p: (s32[], bf16[64,32])) -> pred[] {{
  %p = (s32[], bf16[64,32]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main (a: bf16[64,32], b: bf16[32,16]) -> bf16[64,16] {{
  %a = bf16[64,32]{{1,0}} parameter(0)
  %b = bf16[32,16]{{1,0}} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[64,32]{{1,0}}) tuple(%zero, %a)
  %w = (s32[], bf16[64,32]{{1,0}}) while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"3"}}}}
  %x = bf16[64,32]{{1,0}} get-tuple-element(%w), index=1
  %e = bf16[64,32]{{1,0}} exponential(%x)
  %m = bf16[64,32]{{1,0}} multiply(%e, %x)
  %f = bf16[64,16]{{1,0}} fusion(%m, %b), kind=kCustom, calls=%triton_gemm, backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm"}}}}
  %k = bf16[64,16]{{1,0}} custom-call(%f), custom_call_target="tpu_custom_call", backend_config={{"custom_call_config": {{"body": "TUzvUg", "cost_estimate": {{"flops": 5000, "transcendentals": 0, "bytes_accessed": 4096}}}}}}
  ROOT %r = bf16[64,16]{{1,0}} bitcast(%k)
}}
"""
