"""console.py: the runs and fits tables on and off a terminal, fitted to its width without cutting a cell."""

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from jaxscale import analyze
from jaxscale.console import fits_console_table, print_runs
from test_comparison import synthetic_run
from test_report import small_runs


# ------------------------------------------------------------------ the end-of-run table


def _runs_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = synthetic_run(rng, devices=(1, 8), xla_flags="--xla_cpu_use_thunk_runtime=false",
                         size_name="d1024-l24-seq2048-long-name", params=123456789, tokens_per_s=12345.6,
                         step_time_cv=0.0123, peak_bytes_in_use="")
    rows.loc[0, "xla_flags"] = ""
    return rows


def test_run_table_off_a_terminal_is_plain_and_whole():
    rows = _runs_rows()
    buffer = io.StringIO()
    print_runs(Console(file=buffer, width=80), rows)
    text = buffer.getvalue()
    assert "…" not in text and "│" not in text
    lines = text.splitlines()
    assert lines[0] == "jaxscale runs" and len(lines) == 2 + 1 + len(rows)
    assert max(map(len, lines)) > 80  # full width, as a log keeps it
    body = lines[3:]
    for (_, r), line in zip(rows.iterrows(), body):
        cells = line.split()
        assert cells[0] == "d1024-l24-seq2048-long-name" and cells[1] == r["strategy"]
        assert cells[2] == str(r["n_devices"]) and cells[3] == r["mesh_shape"]
        assert f"{r['step_time_s']:.4g}" in cells
        assert "ok" in cells
    assert body[1].endswith("--xla_cpu_use_thunk_runtime=false")  # the varying flag set is a column


def test_run_table_on_a_terminal_stays_rich():
    buffer = io.StringIO()
    print_runs(Console(file=buffer, width=200, force_terminal=True), _runs_rows())
    text = buffer.getvalue()
    assert "jaxscale runs" in text and "\x1b[" in text  # styled for the terminal, not the plain log table


def _visible(text: str) -> list[str]:
    from rich.text import Text

    return [Text.from_ansi(line).plain for line in text.splitlines()]


@pytest.mark.parametrize("width", [80, 200])
def test_run_table_on_a_terminal_fits_its_width_without_cutting_a_cell(width):
    rows = _runs_rows()
    buffer = io.StringIO()
    print_runs(Console(file=buffer, width=width, force_terminal=True), rows)
    lines = _visible(buffer.getvalue())
    assert max(map(len, lines)) <= width and not any("…" in line for line in lines)
    text = "\n".join(lines)
    for _, r in rows.iterrows():  # the cells that are shown are shown whole
        assert "d1024-l24-seq2048-long-name" in text and f"{r['step_time_s']:.4g}" in text
    if width == 80:
        assert "left out at 80 columns: mesh" in text  # what did not fit is named, not cut
    else:
        assert "left out" not in text and "--xla_cpu_use_thunk_runtime=false" in text and "data:8,model:1" in text


# ------------------------------------------------------------------ the fits table


def test_console_table_lists_every_fit():
    fits = analyze.default_fits(small_runs())
    table = fits_console_table(fits)
    assert table.row_count == len(fits)
    console = Console(record=True, width=220)
    console.print(table)
    rendered = console.export_text()
    assert "worse than ideal" in rendered and "sublinear" in rendered and "model_size" in rendered


@pytest.mark.parametrize("width", [80, 200])
def test_console_fits_table_is_readable_at_its_width(width):
    """At 80 columns every fit still shows its y, group, exponent, verdict and note; at 200 every column, whole."""
    from rich.text import Text

    fits = analyze.default_fits(small_runs())
    console = Console(record=True, width=width, force_terminal=True)
    console.print(fits_console_table(fits, width))
    lines = [Text.from_ansi(line).plain for line in console.export_text(styles=True).splitlines()]
    text = "\n".join(lines)
    assert max(map(len, lines)) <= width and "…" not in text
    words = set(text.split())
    for _, r in fits.iterrows():
        for cell in (r["y"], r["assessment"], f"{r['exponent']:+.3f}" if pd.notna(r["exponent"]) else ""):
            assert not cell or all(w in words for w in cell.split()), cell
        # a note may wrap at a space, never inside a word
        for word in str(r["note"]).replace("shared host (see top)", "").split():
            assert word in words, (word, r["note"])
    header = lines[1].split()
    if width == 80:
        assert {"y", "group", "exponent", "assessment", "note"} <= set(header) and "left out at 80" in text
    else:
        assert header == ["family", "y", "x", "group", "exponent", "CI", "ideal", "assessment", "regime", "curve",
                          "n", "note"] and "left out" not in text
