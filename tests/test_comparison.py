"""jaxscale compare: intervals with planted ratios, verdicts, the runtime diff, bad input, the CLI.

Most runs here are synthetic runs.csv files whose samples are drawn with a
known ratio; one tiny real sweep checks that what `jaxscale run` writes is
compared as it should be.
"""

import itertools
import json
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

import jaxscale
from helpers import jaxscale as run_cli
from jaxscale import cli
from jaxscale.comparison import CompareError, read_side, runtime_diff, verdict
from jaxscale.records import COLUMNS, RowWriter, read_rows
from jaxscale.report import format_markdown

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")


def synthetic_run(rng, *, n_steps=10, cv=0.05, drift_sd=0.0, scale=None, devices=(1, 2, 4, 8),
                  strategies=STRATEGIES, row_source="measured", **extra) -> pd.DataFrame:
    """One run of a 16-point grid: step times lognormal around a per-point base, per-run drift, planted scales.

    scale maps (strategy, n_devices) to a factor applied to that point's steps.
    """
    rows = []
    for n, strategy in itertools.product(devices, strategies):
        base_s = 0.01 * n ** -0.5 * (1 + STRATEGIES.index(strategy) / 4)
        run_factor = math.exp(rng.normal(0, drift_sd)) if drift_sd else 1.0
        samples = base_s * run_factor * np.exp(rng.normal(0, cv, n_steps)) * (scale or {}).get((strategy, n), 1.0)
        data = 1 if strategy == "tp" else (n if strategy != "fsdp_tp" else max(n // 2, 1))
        row = {c: "" for c in COLUMNS}
        row.update(schema_version=2, profile="synthetic", row_source=row_source, status="ok", size_name="d64-l2",
                   strategy=strategy, n_devices=n, n_processes=1, mesh_shape=f"data:{data},model:{n // data}",
                   d_model=64, n_layers=2, n_heads=8, d_ff=256, seq_len=64, vocab=512, global_batch=16,
                   batch_mode="strong", dtype="float32", remat="none", attention="auto", scan_layers=True,
                   xla_flags="", backend="cpu", device_kind="cpu", jax_version="0.10.2", n_timed_steps=n_steps,
                   step_time_samples_s=";".join(f"{s:.6g}" for s in samples),
                   step_time_s=float(np.median(samples)), mfu=0.3 * 0.01 / float(np.median(samples)) / n,
                   compiled_total_bytes=1_000_000 // n, all_reduce_bytes=4096 * (n > 1), all_gather_bytes=0,
                   reduce_scatter_bytes=0, all_to_all_bytes=0, collective_permute_bytes=0)
        row.update(extra)
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(folder, rows: pd.DataFrame, jax_version="0.10.2"):
    """A report folder as `jaxscale run` leaves it: runs.csv and runtime.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with RowWriter(folder / "runs.csv") as writer:
        for _, r in rows.iterrows():
            writer.append({k: v for k, v in r.items() if k in COLUMNS})
    (folder / "runtime.json").write_text(json.dumps({"backend": "cpu", "device_kind": "cpu", "jax_version": jax_version,
                                                     "jaxlib_version": jax_version, "process_count": 1}))
    return folder


# ------------------------------------------------------------------ verdicts


def test_verdict_rules():
    assert verdict(1.30, 1.20, 1.40, 0.05) == "slower"
    assert verdict(1.04, 1.01, 1.07, 0.05) == "noisy"  # significant but the estimate is under the threshold
    assert verdict(0.70, 0.60, 0.80, 0.05) == "faster"
    assert verdict(1.01, 0.97, 1.04, 0.05) == "same"
    assert verdict(1.20, 0.90, 1.60, 0.05) == "noisy"


# ------------------------------------------------------------------ verdicts on grids


def test_runs_drawn_from_one_distribution_raise_few_alarms():
    """False alarms over 30 pairs of synthetic runs with a 10% drift per point between runs.

    The intervals are simultaneous at 95%, so about 5% of pairs at most may
    call any point slower or faster (without the drift term, most would).
    """
    rng = np.random.default_rng(11)
    alarms = 0
    for _ in range(30):
        table = jaxscale.compare(synthetic_run(rng, drift_sd=0.1), synthetic_run(rng, drift_sd=0.1))
        alarms += table["verdict"].isin(["slower", "faster"]).any()
    assert alarms <= 4  # 13%: room for the binomial spread of 30 pairs around 5%


def test_planted_slowdown_is_found_with_its_ratio():
    rng = np.random.default_rng(3)
    base = synthetic_run(rng, drift_sd=0.01)
    new = synthetic_run(rng, drift_sd=0.01, scale={("fsdp", 4): 1.3})
    table = jaxscale.compare(base, new, threshold=0.05)
    slow = table[table["verdict"] == "slower"]
    assert list(zip(slow["strategy"], slow["n_devices"])) == [("fsdp", 4)]
    r = slow.iloc[0]
    assert r["ratio"] == pytest.approx(1.3, rel=0.05) and r["ratio_ci_low"] < 1.3 < r["ratio_ci_high"]
    assert table.iloc[0]["strategy"] == "fsdp"  # sorted by effect
    assert table.attrs["point_confidence"] == pytest.approx(1 - 0.05 / 16)  # Bonferroni over 16 points
    assert jaxscale.compare(base, new, familywise=False).attrs["point_confidence"] == 0.95
    assert (table["verdict"] != "faster").all()


def test_uniform_speedup_is_faster_everywhere():
    rng = np.random.default_rng(5)
    base = synthetic_run(rng)
    new = synthetic_run(rng, scale={k: 0.7 for k in itertools.product(STRATEGIES, (1, 2, 4, 8))})
    table = jaxscale.compare(base, new)
    assert (table["verdict"] == "faster").all()
    assert table["ratio"].median() == pytest.approx(0.7, rel=0.02)
    assert ((table["ratio_ci_low"] < 0.7) & (0.7 < table["ratio_ci_high"])).all()


def test_same_when_the_interval_is_inside_the_threshold():
    rng = np.random.default_rng(9)
    table = jaxscale.compare(synthetic_run(rng, n_steps=100, cv=0.02), synthetic_run(rng, n_steps=100, cv=0.02))
    assert (table["verdict"] == "same").all()


def test_several_runs_a_side_take_the_interval_over_runs():
    rng = np.random.default_rng(4)
    base = [synthetic_run(rng, drift_sd=0.05) for _ in range(4)]
    new = [synthetic_run(rng, drift_sd=0.05, scale={("tp", 2): 1.5}) for _ in range(4)]
    table = jaxscale.compare(base, new)
    assert (table["interval_over"] == "runs").all() and (table["n_runs_base"] == 4).all()
    assert (table["n_samples_new"] == 40).all()
    r = table[(table["strategy"] == "tp") & (table["n_devices"] == 2)].iloc[0]
    assert r["verdict"] == "slower" and r["ratio"] == pytest.approx(1.5, rel=0.1)


def test_changes_in_mfu_memory_and_collectives():
    rng = np.random.default_rng(6)
    base = synthetic_run(rng)
    new = synthetic_run(rng)
    new.loc[new["strategy"] == "fsdp", "compiled_total_bytes"] += 4096
    new.loc[new["strategy"] == "dp", "all_gather_bytes"] = 1000
    table = jaxscale.compare(base, new).set_index(["strategy", "n_devices"])
    assert table.loc[("fsdp", 4), "compiled_total_bytes_delta"] == 4096
    assert table.loc[("dp", 4), "collective_bytes_delta"] == 1000
    assert table.loc[("dp", 4), "collective_bytes_new"] == 4096 + 1000
    mfu = new[(new["strategy"] == "tp") & (new["n_devices"] == 8)]["mfu"].iloc[0] - \
        base[(base["strategy"] == "tp") & (base["n_devices"] == 8)]["mfu"].iloc[0]
    assert table.loc[("tp", 8), "mfu_delta"] == pytest.approx(mfu)


def test_one_sided_and_failed_points():
    rng = np.random.default_rng(8)
    base = synthetic_run(rng)
    new = synthetic_run(rng, devices=(1, 2, 4, 16))
    new.loc[(new["strategy"] == "tp") & (new["n_devices"] == 2), ["status", "error"]] = ["oom", "RESOURCE_EXHAUSTED"]
    table = jaxscale.compare(base, new)
    by_verdict = table.groupby("verdict").size().to_dict()
    assert by_verdict["base_only"] == 4 and by_verdict["new_only"] == 4 and by_verdict["failed"] == 1
    failed = table[table["verdict"] == "failed"].iloc[0]
    assert failed["strategy"] == "tp" and "oom" in failed["note"]


def test_plan_against_a_run_compares_predictions_without_an_interval():
    rng = np.random.default_rng(2)
    run = synthetic_run(rng, peak_bytes_in_use=2_000_000)
    plan = synthetic_run(rng, row_source="planned:v5e:2x2", status="planned", step_time_s="",
                         step_time_samples_s="", predicted_step_time_s=0.004, predicted_mfu=0.5)
    table = jaxscale.compare(plan, run)
    assert (table["compared"] == "planned/measured").all()
    assert table["ratio_ci_low"].isna().all() and table["note"].str.contains("no interval").all()
    r = table[(table["strategy"] == "dp") & (table["n_devices"] == 1)].iloc[0]
    measured = run[(run["strategy"] == "dp") & (run["n_devices"] == 1)].iloc[0]
    assert r["ratio"] == pytest.approx(float(np.median([float(s) for s in measured["step_time_samples_s"].split(";")]))
                                       / 0.004)
    assert r["memory_ratio"] == pytest.approx(2_000_000 / 1_000_000)
    assert r["verdict"] == ("slower" if r["ratio"] > 1.05 else "faster" if r["ratio"] < 0.95 else "same")


def test_remat_policies_are_points_of_their_own():
    rng = np.random.default_rng(14)
    base = pd.concat([synthetic_run(rng, remat="none"), synthetic_run(rng, remat="full")], ignore_index=True)
    new = pd.concat([synthetic_run(rng, remat="none"), synthetic_run(rng, remat="full", scale={("dp", 2): 1.5})],
                    ignore_index=True)
    table = jaxscale.compare(base, new)
    assert len(table) == 32
    slow = table[table["verdict"] == "slower"]
    assert list(zip(slow["strategy"], slow["n_devices"], slow["remat"])) == [("dp", 2, "full")]
    md = format_markdown(table, runtime_diff([], []))
    assert "| d64-l2 dp n=2 remat=full |" in md and "| d64-l2 dp n=2 remat=none |" in md


def test_runtime_diff_names_what_changed():
    diff = runtime_diff([{"jax_version": "0.10.1", "device_kind": "TPU v5 lite", "process_index": 0,
                          "peak": {"tflops": 197.0}}],
                        [{"jax_version": "0.10.2", "device_kind": "TPU v5 lite", "process_index": 3,
                          "peak": {"tflops": 197.0}, "libtpu_version": "0.0.42"}])
    assert diff.to_dict("records") == [
        {"field": "jax_version", "base": "0.10.1", "new": "0.10.2", "main": True},
        {"field": "libtpu_version", "base": "(absent)", "new": "0.0.42", "main": True}]
    other = runtime_diff([{"jax_version": "0.10.2", "planned_at": "t1"}], [{"jax_version": "0.10.2"}])
    assert other.to_dict("records") == [{"field": "planned_at", "base": "t1", "new": "(absent)", "main": False}]


# ------------------------------------------------------------------ the command


def test_cli_planted_slowdown_exit_1_with_diff_and_files(tmp_path, capsys):
    rng = np.random.default_rng(12)
    base = write_report(tmp_path / "base", synthetic_run(rng), jax_version="0.10.1")
    new = write_report(tmp_path / "new", synthetic_run(rng, scale={("dp", 8): 1.4}))
    code = cli.main(["compare", str(base), str(new), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "jax_version 0.10.1 -> 0.10.2" in out and "slower: d64-l2 dp n=8: 1.4" in out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| jax_version | 0.10.1 | 0.10.2 |" in md and "slower: 1" in md
    assert md.index("## Runtime") < md.index("## Points")
    written = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(written) == 16 and {"ratio", "ratio_ci_low", "ratio_ci_high", "verdict"} <= set(written.columns)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    # several a side, and the same reports against themselves pass the gate
    assert cli.main(["compare", "--base", str(base), "--base", str(base / "runs.csv"), "--new", str(base),
                     "--out", str(tmp_path / "self")]) == 0


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxscale: error: ") and "\n" not in err, err
    return err


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    good = write_report(tmp_path / "good", synthetic_run(rng))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(",".join(COLUMNS) + "\n")
    (tmp_path / "nofolder").mkdir()
    other = write_report(tmp_path / "other", synthetic_run(rng, global_batch=32))
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    garbled = synthetic_run(rng)
    garbled.loc[3, "step_time_samples_s"] = "0.1;fast;0.2"
    write_report(tmp_path / "garbled", garbled)
    cases = [
        ([str(tmp_path / "empty.csv"), str(good)], "empty"),
        ([str(good), str(tmp_path / "header.csv")], "no rows"),
        ([str(tmp_path / "nofolder"), str(good)], "without runs.csv"),
        ([str(good), str(other)], "no point"),
        ([str(good), str(tmp_path / "table.csv")], "not jaxscale rows"),
        ([str(good), str(tmp_path / "missing")], "no such file"),
        ([str(good), str(tmp_path / "garbled")], "step_time_samples_s"),
        ([str(good)], "two reports"),
        ([str(good), str(good), "--threshold", "1.5"], "threshold"),
    ]
    for argv, phrase in cases:
        assert cli.main(["compare", *argv]) == 2, argv
        assert phrase in _one_line_error(capsys), argv


def test_read_side_keeps_runs_apart(tmp_path):
    rng = np.random.default_rng(1)
    a = write_report(tmp_path / "a", synthetic_run(rng))
    b = write_report(tmp_path / "b", synthetic_run(rng))
    side = read_side([a, b / "runs.csv"])
    assert len(side.runs) == 2 and len(side.runtimes) == 2
    with pytest.raises(CompareError):
        read_side([tmp_path])


def test_real_runs_compare_as_written(tiny_run, tmp_path):
    """A tiny `jaxscale run` (conftest's tiny_run); its copy with one point slower and another jax in runtime.json.

    Steps of a millisecond on a shared CPU can vary tenfold within a run, so
    the planted factor is twice the point's own max/min spread: every pairwise
    ratio then exceeds 2, whatever the noise (the synthetic tests plant 1.3x).
    """
    base = tiny_run.report
    new = tmp_path / "new"
    shutil.copytree(base, new)
    rows = read_rows(new / "runs.csv")
    slow = (rows["strategy"] == "fsdp") & (rows["n_devices"] == 2)
    samples = np.array([float(s) for s in rows.loc[slow, "step_time_samples_s"].iloc[0].split(";")])
    factor = round(2 * samples.max() / samples.min(), 1)
    rows.loc[slow, "step_time_samples_s"] = ";".join(repr(float(s)) for s in samples * factor)
    (new / "runs.csv").unlink()
    with RowWriter(new / "runs.csv") as writer:
        for _, r in rows.iterrows():
            writer.append({k: ("" if pd.isna(v) else v) for k, v in r.items()})
    runtime = json.loads((new / "runtime.json").read_text())
    runtime["jax_version"] = "9.9.9"
    (new / "runtime.json").write_text(json.dumps(runtime))

    proc = run_cli("compare", base, new, "--out", tmp_path / "cmp", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(table) == 4 and (table["compared"] == "measured/measured").all()
    r = table[(table["strategy"] == "fsdp") & (table["n_devices"] == 2)].iloc[0]
    assert r["verdict"] == "slower" and r["ratio"] == pytest.approx(factor, rel=1e-6)
    others = table.drop(index=r.name)
    assert (others["ratio"] == 1.0).all() and (others["verdict"] != "slower").all()
    assert f"jax_version {read_rows(base / 'runs.csv')['jax_version'].iloc[0]} -> 9.9.9" in proc.stdout
    assert "| jax_version |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert cli.main(["compare", str(base), str(base), "--out", str(tmp_path / "self")]) == 0


# ------------------------------------------------------------------ runs, duplicates and the same run twice


def test_two_runs_in_one_file_are_two_runs(tmp_path):
    rng = np.random.default_rng(5)
    first, second = synthetic_run(rng, run_id="run-a"), synthetic_run(rng, run_id="run-b")
    both = pd.concat([first, second], ignore_index=True)
    table = jaxscale.compare([first, second], both)
    assert (table["n_runs_base"] == 2).all() and (table["n_runs_new"] == 2).all()
    assert (table["ratio"] == 1.0).all()


def test_a_run_recorded_twice_counts_once(tmp_path):
    """Two concurrent resumes of one folder used to record its points twice: one run, one row per point."""
    rng = np.random.default_rng(6)
    base = synthetic_run(rng, run_id="base")
    new = synthetic_run(rng, run_id="new", scale={("dp", 8): 1.4})
    doubled = pd.concat([new, new], ignore_index=True)
    with pytest.warns(UserWarning, match="new: dropped 16 duplicate row"):
        table = jaxscale.compare(base, doubled)
    assert (table["n_runs_new"] == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = jaxscale.compare(base, new)
    assert table["ratio"].tolist() == reference["ratio"].tolist()


def test_cli_says_when_both_sides_are_the_same_run(tmp_path, capsys):
    rng = np.random.default_rng(7)
    report = write_report(tmp_path / "r", synthetic_run(rng))
    copy = tmp_path / "copy"
    shutil.copytree(report, copy)
    assert cli.main(["compare", str(report), str(copy), "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "base and new hold the same run" in err and read_rows(report / "runs.csv")["run_id"].iloc[0] in err
    assert cli.main(["compare", "--base", str(report), "--base", str(report / "runs.csv"), "--new", str(copy),
                     "--out", str(tmp_path / "cmp2")]) == 0
    assert "holds the same rows as" in capsys.readouterr().err


def test_cli_output_path_problems_are_one_line(tmp_path, capsys):
    rng = np.random.default_rng(8)
    base = write_report(tmp_path / "base", synthetic_run(rng))
    new = write_report(tmp_path / "new", synthetic_run(rng))
    (tmp_path / "file").write_text("x")
    assert cli.main(["compare", str(base), str(new), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert not (new / "compare").exists()
