"""plots.py: the fit plots drawn without rows, and axis labels with units."""

from jaxscale import analyze
from jaxscale.plots import axis_label, plot_families
from test_report import small_runs


def test_plots_without_runs(tmp_path):
    fits = analyze.default_fits(small_runs())
    paths = plot_families(None, fits[fits["y"] == "step_time_s"], tmp_path / "plots")
    assert paths and all(p.stat().st_size > 10_000 for p in paths)


def test_axis_labels_carry_units():
    assert axis_label("step_time_s") == "step time (s)"
    assert axis_label("all_gather_bytes") == "all gather (bytes)"
    assert axis_label("compile_s") == "compile (s)"
