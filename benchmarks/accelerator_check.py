"""The first thing to run on a GPU or TPU: does jaxscale measure this accelerator right?

One command, one folder (by default profiles/results/<device>-accelerator-check/):

1. sweep/: the gpu-1x grid (its sizes on one device; named tpu-1x on a TPU),
   run by `jaxscale run` as a user would (worker process per point).
2. memory.csv: per point, the compiled step's memory (XLA's memory analysis)
   against the runtime peak of the device allocator, and their ratio.
3. step_comparison.csv: a plain-JAX transformer train step, written here
   independently of jaxscale's model, with the dims of the largest size, timed
   in alternating rounds with jaxscale's step for the same point; the ratio
   jaxscale / plain is printed (near 1 means jaxscale measures a step a JAX user
   would write).
4. oversized/: one point far beyond the device's memory, which must come back
   as an ``oom`` or ``over_budget`` row, not a crash.
5. summary.md: the figures above.

On one H100 or TPU v5e it should finish within 9 minutes. ``--cpu-smoke``
runs the same pipeline with tiny sizes on the CPU (tests use it).

Usage:
  python benchmarks/accelerator_check.py                 # on a GPU or TPU
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


# ------------------------------------------------- an independent train step


def plain_train_step(d_model: int, n_layers: int, n_heads: int, d_ff: int, vocab: int, dtype):
    """A decoder-only transformer train step in plain JAX: (init(key), step(state, tokens)).

    Pre-norm blocks (RMSNorm, causal attention with rotary positions, GELU MLP),
    untied embedding and head, float32 parameters, matmuls in ``dtype``, AdamW
    (optax) with the same hyper-parameters as jaxscale. Written without
    jaxscale's code, so that the two steps can be timed against each other.
    """
    import jax
    import jax.numpy as jnp
    import optax

    head_dim = d_model // n_heads

    def init(key):
        keys = iter(jax.random.split(key, 2 + 6 * n_layers))

        def normal(shape, fan_in):
            return jax.random.normal(next(keys), shape, jnp.float32) * fan_in ** -0.5

        layers = [{"ln1": jnp.ones((d_model,)), "ln2": jnp.ones((d_model,)),
                   "wqkv": jnp.stack([normal((d_model, n_heads, head_dim), d_model) for _ in range(3)]),
                   "wo": normal((n_heads, head_dim, d_model), d_model),
                   "w1": normal((d_model, d_ff), d_model), "w2": normal((d_ff, d_model), d_ff)}
                  for _ in range(n_layers)]
        params = {"embed": normal((vocab, d_model), 1), "layers": layers, "ln_f": jnp.ones((d_model,)),
                  "head": normal((d_model, vocab), d_model)}
        return params, tx.init(params)

    def norm(x, scale):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6) * scale).astype(dtype)

    def rotary(x):
        t, half = x.shape[1], head_dim // 2
        inv = 1.0 / 10000.0 ** (jnp.arange(half) / half)
        ang = jnp.arange(t)[:, None] * inv[None]
        cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        a, b = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(dtype)

    def forward(params, tokens):
        x = params["embed"][tokens].astype(dtype)
        for p in params["layers"]:
            h = norm(x, p["ln1"])
            q, k, v = (jnp.einsum("btd,dhk->bthk", h, w.astype(dtype)) for w in p["wqkv"])
            a = jax.nn.dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
            x = x + jnp.einsum("bthk,hkd->btd", a, p["wo"].astype(dtype))
            h = norm(x, p["ln2"])
            x = x + jax.nn.gelu(h @ p["w1"].astype(dtype)) @ p["w2"].astype(dtype)
        return (norm(x, params["ln_f"]) @ params["head"].astype(dtype)).astype(jnp.float32)

    def loss_fn(params, tokens):
        logits = forward(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    tx = optax.adamw(3e-4, weight_decay=0.1)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(init), jax.jit(step, donate_argnums=(0, 1))


def compare_steps(profile_path: Path, rounds: int, steps: int) -> list[dict]:
    """jaxscale's step and the plain step of the largest size, timed in alternating rounds."""
    from jaxscale.targets import quiet_plugins

    quiet_plugins()  # as the CLI does: no start-up noise from compile-only plugins
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxscale.config import load_profile
    from jaxscale.grid import build_grid
    from jaxscale.step import compile_point

    profile = load_profile(str(profile_path))
    points, _ = build_grid(profile, jax.device_count())
    point = max(points, key=lambda p: p.model.d_model * p.model.n_layers)
    m = point.model
    ours = compile_point(point, profile.run)
    state = dict(zip(("params", "opt"), ours.init_state()))
    batch = ours.make_batch(0)

    def run_ours():
        for _ in range(steps):
            state["params"], state["opt"], loss = ours.compiled(state["params"], state["opt"], batch)
        return loss

    init, step = plain_train_step(m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab, jnp.dtype(profile.run.dtype))
    plain = dict(zip(("params", "opt"), init(jax.random.key(0))))
    tokens = jax.device_put(np.asarray(jax.device_get(batch)), jax.local_devices()[0])

    def run_plain():
        for _ in range(steps):
            plain["params"], plain["opt"], loss = step(plain["params"], plain["opt"], tokens)
        return loss

    jax.block_until_ready(run_ours())  # warm up: compile and first executions
    jax.block_until_ready(run_plain())
    samples = {"jaxscale": [], "plain": []}
    for _ in range(rounds):
        for name, fn in (("jaxscale", run_ours), ("plain", run_plain)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - start) / steps)
    out = []
    for r in range(rounds):
        out.append({"round": r, "size_name": m.size_name, "d_model": m.d_model, "n_layers": m.n_layers,
                    "global_batch": point.global_batch, "seq_len": m.seq_len, "dtype": profile.run.dtype,
                    "jaxscale_step_s": samples["jaxscale"][r], "plain_step_s": samples["plain"][r]})
    return out


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
    args = parser.parse_args(argv)
    start = time.perf_counter()
    hint = "cpu" if args.cpu_smoke else backend_hint()
    if hint == "cpu" and not args.cpu_smoke:
        print("no GPU or TPU found; use --cpu-smoke to check the pipeline on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "profiles" / "results" / f"accelerator-check-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    grid, oversized = check_profiles(args.cpu_smoke, hint)
    (out / "grid.toml").write_text(dump_profile(grid))
    (out / "oversized.toml").write_text(dump_profile(oversized))

    code, report = jaxscale_run(out / "grid.toml", out / ".sweep")
    shutil.rmtree(out / "sweep", ignore_errors=True)
    report.rename(out / "sweep")
    shutil.rmtree(out / ".sweep")
    runtime = json.loads((out / "sweep" / "runtime.json").read_text())
    print(f"sweep: {runtime['device_kind']} ({runtime['backend']}), exit {code}, rows in {out / 'sweep' / 'runs.csv'}")

    memory = memory_table(out / "sweep" / "runs.csv")
    write_csv(out / "memory.csv", memory)
    for r in memory:
        ratio = f"{r['peak_over_compiled']:.3f}" if r["peak_over_compiled"] else "n/a (no allocator statistics)"
        print(f"  {r['size_name']:>6} {r['status']:<10} compiled {r['compiled_total_bytes'] or 0:>14,.0f} B  "
              f"runtime peak {r['peak_bytes_in_use'] or 0:>14,.0f} B  peak/compiled {ratio}")

    big_code, big_report = jaxscale_run(out / "oversized.toml", out / ".oversized")
    shutil.rmtree(out / "oversized", ignore_errors=True)
    big_report.rename(out / "oversized")
    shutil.rmtree(out / ".oversized")
    with open(out / "oversized" / "runs.csv", newline="") as f:
        (big,) = list(csv.DictReader(f))
    big_ok = big["status"] in ("oom", "over_budget")
    print(f"oversized point ({OVERSIZED['name']}): status {big['status']} "
          f"({'as expected' if big_ok else 'EXPECTED oom or over_budget'}): {big['error'][:200]}")

    comparison = compare_steps(out / "grid.toml", args.rounds, args.steps)
    write_csv(out / "step_comparison.csv", comparison)
    ours = statistics.median(r["jaxscale_step_s"] for r in comparison)
    plain = statistics.median(r["plain_step_s"] for r in comparison)
    c0 = comparison[0]
    print(f"step {c0['size_name']} (d_model {c0['d_model']}, {c0['n_layers']} layers, batch {c0['global_batch']}, "
          f"seq {c0['seq_len']}, {c0['dtype']}): jaxscale {ours * 1e3:.2f} ms, plain JAX {plain * 1e3:.2f} ms, "
          f"ratio {ours / plain:.3f} (median of {args.rounds} alternating rounds of {args.steps} steps)")

    wall = time.perf_counter() - start
    summary = [f"# Accelerator check: {runtime['device_kind']} ({runtime['backend']})", "",
               f"- jax {runtime.get('jax_version')}, {runtime.get('local_devices')} local device(s); wall {wall:.0f} s",
               f"- sweep: `{out.name}/sweep/runs.csv`, exit code {code}",
               f"- oversized point {OVERSIZED['name']}: `{big['status']}` ({'ok' if big_ok else 'FAILED'})",
               f"- step of {c0['size_name']}: jaxscale {ours * 1e3:.3f} ms, plain JAX {plain * 1e3:.3f} ms, "
               f"ratio {ours / plain:.3f}", "", "| size | status | compiled bytes | runtime peak bytes | peak/compiled |",
               "| --- | --- | ---: | ---: | ---: |"]
    for r in memory:
        summary.append(f"| {r['size_name']} | {r['status']} | {r['compiled_total_bytes'] or ''} | "
                       f"{r['peak_bytes_in_use'] or ''} | "
                       f"{'' if not r['peak_over_compiled'] else format(r['peak_over_compiled'], '.3f')} |")
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
