"""plots.py: the fit plots drawn without rows, axis labels with units, the caption of the ratio plot."""

import numpy as np

import jaxscale
from jaxscale import analyze
from jaxscale.plots import axis_label, plot_families
from test_comparison import synthetic_run
from test_report import small_runs


def test_plots_without_runs(tmp_path):
    fits = analyze.default_fits(small_runs())
    paths = plot_families(None, fits[fits["y"] == "step_time_s"], tmp_path / "plots")
    assert paths and all(p.stat().st_size > 10_000 for p in paths)


def test_axis_labels_carry_units():
    assert axis_label("step_time_s") == "step time (s)"
    assert axis_label("all_gather_bytes") == "all gather (bytes)"
    assert axis_label("compile_s") == "compile (s)"


def test_plot_caption_says_what_hollow_marks(tmp_path, monkeypatch):
    import matplotlib.figure

    from jaxscale.plots import plot_ratios

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.append(fig._suptitle.get_text()))
    rng = np.random.default_rng(9)
    plot_ratios(jaxscale.compare(synthetic_run(rng), synthetic_run(rng)), tmp_path / "c.png")
    assert "hollow: a plan against a run" in titles[0]
