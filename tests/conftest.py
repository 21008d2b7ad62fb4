"""Test setup: 8 virtual CPU devices, set before JAX is imported anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Calibrations and the compilation cache of tests stay out of the user's cache.
os.environ.setdefault("JAXSCALE_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))


@pytest.fixture
def no_plots(monkeypatch):
    """An analysis in this process draws no plots: for tests that read its tables and text, not its figures
    (drawing is most of an analysis' time; test_report and test_cli's run check the plots)."""
    from jaxscale import report

    monkeypatch.setattr(report, "plot_families", lambda *args, **kwargs: [])
