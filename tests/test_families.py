"""families.py: derived columns, and what rows cannot give (no jax here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxscale import families
from jaxscale.families import add_memory_column


def test_add_memory_column_prefers_measured_peak():
    df = pd.DataFrame({"peak_bytes_in_use": ["", "0", "500", None], "compiled_total_bytes": [100, 200, 300, ""]})
    out = add_memory_column(df)
    np.testing.assert_array_equal(out["memory_per_device_bytes"], [100, 200, 500, np.nan])
    assert list(out["memory_source"]) == ["compiled_total_bytes", "compiled_total_bytes", "peak_bytes_in_use", ""]
    assert add_memory_column(pd.DataFrame({"a": [1]}))["memory_per_device_bytes"].isna().all()
    assert "memory_per_device_bytes" not in df.columns


def test_unusable_values_are_counted_per_column():
    rows = pd.DataFrame({"status": ["ok", "ok", "ok", "error", "ok"], "step_time_s": [0.1, 0.0, np.inf, -1, None],
                         "n_devices": [1, 2, 4, 8, -2]})
    assert families.unusable_values(rows, ["step_time_s", "n_devices", "absent"]) == {"step_time_s": 2,
                                                                                    "n_devices": 1}


def test_why_no_fits_says_what_is_the_case():
    failed = pd.DataFrame({"status": ["oom", "oom", "compile_error"], "n_devices": [1, 2, 4]})
    assert families.why_no_fits(failed) == ("every one of the 3 rows failed (2 oom, 1 compile_error), so there is "
                                            "nothing to fit")
    one = pd.DataFrame({"status": ["ok"], "n_devices": [1]})
    assert families.why_no_fits(one).startswith("1 of the 1 rows succeeded; a fit needs at least 3 points")
