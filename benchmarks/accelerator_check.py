"""The first thing to run on a GPU or TPU: does jaxscale measure this accelerator right?

One command, one folder (by default profiles/results/<device>-accelerator-check/,
with the command that made it in command.txt):

1. sweep/: the gpu-1x grid at its shipped defaults (its sizes on one device;
   named tpu-1x on a TPU), run by `jaxscale run` as a user would (a worker
   process per point).
2. memory.csv: per point, the compiled step's memory (XLA's memory analysis)
   against the runtime peak of the device allocator, and their ratio.
3. step_comparison.csv: jaxscale's step of the largest size against a plain
   JAX step of the same model (tests/plain_step.py, written without jaxscale's
   code, the same attention kernel), timed in alternating rounds in one
   process, for each layer form; the ratio jaxscale / plain (near 1 means
   jaxscale measures a step a careful JAX user would write) and the MFU of both.
4. oversized/: one point far beyond the device's memory, which must come back
   as an ``oom`` or ``over_budget`` row, not a crash.
5. device.json: the device's allocator statistics and the allocator settings.
6. summary.md: the figures above.

It finishes within 5 minutes on one H100 or H200. ``--cpu-smoke`` runs the
same pipeline with tiny sizes on the CPU (tests use it).

Usage:
  PYTHONPATH=src python benchmarks/accelerator_check.py                 # on a GPU or TPU
  python benchmarks/accelerator_check.py --cpu-smoke --out /tmp/check
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # peer_step, which takes the plain step from tests/

# The oversized point: about 26B parameters (309 GB of float32 state), beyond any one device.
OVERSIZED = {"name": "26b", "d_model": 8192, "n_layers": 32, "n_heads": 64}
# --cpu-smoke: the gpu-1x pipeline at sizes a CPU runs in seconds.
SMOKE_SIZES = [{"name": "s32", "d_model": 32, "n_layers": 1, "n_heads": 4},
               {"name": "s64", "d_model": 64, "n_layers": 2, "n_heads": 4}]
SMOKE_MODEL = {"seq_len": 16, "vocab": 128}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def dump_profile(raw: dict) -> str:
    lines = []
    for section, table in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k != "sizes"]
        lines.append("")
        for size in table.get("sizes", []) if section == "model" else []:
            lines.append("[[model.sizes]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in size.items()]
            lines.append("")
    return "\n".join(lines)


def check_profiles(cpu_smoke: bool, backend_hint: str) -> tuple[dict, dict]:
    """(the grid's raw profile, the oversized point's raw profile)."""
    raw = tomllib.loads((ROOT / "profiles" / "gpu-1x.toml").read_text())
    raw["run"]["name"] = "tpu-1x" if backend_hint == "tpu" else raw["run"]["name"]
    if cpu_smoke:
        raw["run"].update(name="cpu-smoke", dtype="float32", steps=4, warmup=1)
        raw["model"].update(SMOKE_MODEL)
        raw["model"]["sizes"] = SMOKE_SIZES
    oversized = json.loads(json.dumps(raw))
    oversized["run"]["name"] = "oversized"
    oversized["model"]["sizes"] = [OVERSIZED]
    if cpu_smoke:  # the same parameters in one scanned layer: a CPU compiles 32 unrolled ones for tens of seconds
        oversized["run"]["scan_layers"] = True
    return raw, oversized


def backend_hint() -> str:
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return "tpu"
    return "gpu" if os.path.exists("/dev/nvidia0") else "cpu"


def jaxscale_run(profile: Path, out: Path, extra_env: dict | None = None) -> tuple[int, Path]:
    """Run `jaxscale run PROFILE` into out/<report>; (exit code, report folder)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "jaxscale.cli", "run", str(profile), "--out", str(out),
                           "--no-analyze"], env=env, capture_output=True, text=True)
    reports = [p for p in out.iterdir() if (p / "runs.csv").exists()]
    if len(reports) != 1:
        raise SystemExit(f"jaxscale run {profile} wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode, reports[0]


# ------------------------------------------------- jaxscale's step against a plain one


def compare_steps(grid: dict, source: str, rounds: int, steps: int, forms: list[str]) -> list[dict]:
    """jaxscale's step of the grid's largest size against the plain step, per layer form (peer_step.compare)."""
    from jaxscale import flops
    from jaxscale.config import build_profile
    from jaxscale.devices import resolve_peak
    from peer_step import compare

    raw = json.loads(json.dumps(grid))
    model = {k: v for k, v in raw["model"].items() if k != "sizes"}
    largest = max(raw["model"]["sizes"], key=lambda size: _params({**model, **size}))
    raw["model"]["sizes"] = [largest]
    out = []
    for form in forms:
        raw["run"]["scan_layers"] = form == "scan"
        profile = build_profile(raw, source)
        result = compare(profile, rounds, steps)
        point, m = result["point"], result["point"].model
        peak = resolve_peak(profile.run.dtype)
        model_flops = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                        causal=profile.run.causal_flops)

        def mfu(seconds: float) -> float | None:
            return model_flops / seconds / (peak.tflops * 1e12) if peak.tflops else None

        for r in range(rounds):
            ours, plain = result["samples"]["jaxscale"][r], result["samples"]["plain"][r]
            out.append({"layer_form": form, "round": r, "size_name": m.name, "d_model": m.d_model,
                        "n_layers": m.n_layers, "global_batch": point.global_batch, "seq_len": m.seq_len,
                        "dtype": profile.run.dtype, "attention_impl": result["attention"],
                        "jaxscale_step_s": ours, "plain_step_s": plain, "jaxscale_mfu": mfu(ours),
                        "plain_mfu": mfu(plain), "model_flops_per_step": model_flops,
                        "peak_tflops_per_device": peak.tflops, "peak_source": peak.source,
                        "jaxscale_compile_s": result["jaxscale_compile_s"],
                        "plain_compile_s": result["plain_compile_s"]})
    return out


def _params(size: dict) -> int:
    from jaxscale import flops

    d_ff = size.get("d_ff") or size.get("d_ff_ratio", 4) * size["d_model"]
    return flops.param_count(size["d_model"], size["n_layers"], size["vocab"], d_ff)


def device_facts() -> dict:
    """The local device's allocator statistics (bytes_limit and the rest), as the backend reports them."""
    import jax

    d = jax.local_devices()[0]
    try:
        stats = d.memory_stats() or {}
    except Exception as exc:  # the CPU keeps none
        stats = {"unavailable": str(exc)}
    return {"device_kind": d.device_kind, "platform": d.platform, "memory_stats": stats,
            "jax_version": jax.__version__}


# ------------------------------------------------------------- the report


def memory_table(runs_csv: Path) -> list[dict]:
    with open(runs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        compiled = float(r["compiled_total_bytes"]) if r.get("compiled_total_bytes") else None
        peak = float(r["peak_bytes_in_use"]) if r.get("peak_bytes_in_use") else None
        out.append({"size_name": r["size_name"], "strategy": r["strategy"], "n_devices": r["n_devices"],
                    "status": r["status"], "compiled_total_bytes": compiled, "peak_bytes_in_use": peak,
                    "peak_over_compiled": peak / compiled if peak and compiled else None})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the folder to write (default: profiles/results/<device>-accelerator-check)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the pipeline end to end")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--forms", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"],
                        help="layer forms to time against the plain step (default both)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    hint = "cpu" if args.cpu_smoke else backend_hint()
    if hint == "cpu" and not args.cpu_smoke:
        print("no GPU or TPU found; use --cpu-smoke to check the pipeline on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "profiles" / "results" / f"accelerator-check-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/accelerator_check.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "command.txt").write_text(command + "\n")
    grid, oversized = check_profiles(args.cpu_smoke, hint)
    (out / "grid.toml").write_text(dump_profile(grid))
    (out / "oversized.toml").write_text(dump_profile(oversized))

    code, report = jaxscale_run(out / "grid.toml", out / ".sweep")
    shutil.rmtree(out / "sweep", ignore_errors=True)
    report.rename(out / "sweep")
    shutil.rmtree(out / ".sweep")
    runtime = json.loads((out / "sweep" / "runtime.json").read_text())
    print(f"sweep: {runtime['device_kind']} ({runtime['backend']}), exit {code}, rows in {out / 'sweep' / 'runs.csv'} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    with open(out / "sweep" / "runs.csv", newline="") as f:
        swept = list(csv.DictReader(f))
    for r in swept:
        mfu = f"{float(r['mfu']):.1%}" if r.get("mfu") else "-"
        step = f"{float(r['step_time_s']) * 1e3:.1f} ms" if r.get("step_time_s") else "-"
        print(f"  {r['size_name']:>6} {r['status']:<12} step {step:>10}  MFU {mfu:>6}  "
              f"attention {r.get('attention_impl') or r.get('attention')}", flush=True)

    memory = memory_table(out / "sweep" / "runs.csv")
    write_csv(out / "memory.csv", memory)
    for r in memory:
        ratio = f"{r['peak_over_compiled']:.3f}" if r["peak_over_compiled"] else "n/a (no allocator statistics)"
        print(f"  {r['size_name']:>6} {r['status']:<12} compiled {r['compiled_total_bytes'] or 0:>14,.0f} B  "
              f"runtime peak {r['peak_bytes_in_use'] or 0:>14,.0f} B  peak/compiled {ratio}", flush=True)

    big_code, big_report = jaxscale_run(out / "oversized.toml", out / ".oversized")
    shutil.rmtree(out / "oversized", ignore_errors=True)
    big_report.rename(out / "oversized")
    shutil.rmtree(out / ".oversized")
    with open(out / "oversized" / "runs.csv", newline="") as f:
        (big,) = list(csv.DictReader(f))
    big_ok = big["status"] in ("oom", "over_budget")
    print(f"oversized point ({OVERSIZED['name']}): status {big['status']} "
          f"({'as expected' if big_ok else 'EXPECTED oom or over_budget'}): {big['error'][:200]} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    if not args.cpu_smoke:  # this process opens the device now: give its allocator what the workers had
        from jaxscale.memory import allocator_for

        os.environ.update(allocator_for(grid["run"].get("max_memory_fraction", 0.95)).env)
    comparison = compare_steps(grid, str(out / "grid.toml"), args.rounds, args.steps, args.forms)
    write_csv(out / "step_comparison.csv", comparison)
    (out / "device.json").write_text(json.dumps(device_facts(), indent=1, default=str) + "\n")
    lines = []
    for form in args.forms:
        rows = [r for r in comparison if r["layer_form"] == form]
        ours = statistics.median(r["jaxscale_step_s"] for r in rows)
        plain = statistics.median(r["plain_step_s"] for r in rows)
        c0 = rows[0]
        mfu = (f"; MFU {c0['model_flops_per_step'] / ours / (c0['peak_tflops_per_device'] * 1e12):.1%} vs "
               f"{c0['model_flops_per_step'] / plain / (c0['peak_tflops_per_device'] * 1e12):.1%}"
               if c0["peak_tflops_per_device"] else "")
        lines.append(f"step of {c0['size_name']} ({form} layers; d_model {c0['d_model']}, {c0['n_layers']} layers, "
                     f"batch {c0['global_batch']}, seq {c0['seq_len']}, {c0['dtype']}, attention "
                     f"{c0['attention_impl']}): jaxscale {ours * 1e3:.2f} ms, plain JAX {plain * 1e3:.2f} ms, ratio "
                     f"{ours / plain:.3f}{mfu} (median of {args.rounds} alternating rounds of {args.steps} steps)")
        print(lines[-1], flush=True)

    wall = time.perf_counter() - start
    summary = [f"# Accelerator check: {runtime['device_kind']} ({runtime['backend']})", "",
               f"- command: `{command}`",
               f"- jax {runtime.get('jax_version')}, flax {runtime.get('flax_version')}, "
               f"{runtime.get('local_devices')} local device(s); wall {wall:.0f} s",
               f"- sweep: `sweep/runs.csv`, exit code {code}",
               f"- oversized point {OVERSIZED['name']}: `{big['status']}` ({'ok' if big_ok else 'FAILED'})",
               *(f"- {line}" for line in lines), "",
               "| size | status | step ms | MFU | attention | compiled bytes | runtime peak bytes | peak/compiled |",
               "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r, m in zip(swept, memory):
        summary.append(f"| {r['size_name']} | {r['status']} | "
                       f"{format(float(r['step_time_s']) * 1e3, '.1f') if r.get('step_time_s') else ''} | "
                       f"{format(float(r['mfu']), '.1%') if r.get('mfu') else ''} | "
                       f"{r.get('attention_impl') or r.get('attention')} | {m['compiled_total_bytes'] or ''} | "
                       f"{m['peak_bytes_in_use'] or ''} | "
                       f"{'' if not m['peak_over_compiled'] else format(m['peak_over_compiled'], '.3f')} |")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    if not args.out:
        final = out.parent / f"{slug(runtime['device_kind'])}-accelerator-check"
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
        out = final
    print(f"wrote {out} in {wall:.0f} s")
    return 0 if big_ok and code in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
