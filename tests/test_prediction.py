"""What a compiled step's HLO predicts: each mesh axis's communication over its own link, or no figure with a note."""

from types import SimpleNamespace

import pytest

from jaxscale import chips
from jaxscale.devices import spec_peak
from jaxscale.prediction import predict_comm
from test_devices import _grid


HLO = """
ENTRY %main (a: f32[1024,256]) -> f32[1024,256] {
  %a = f32[1024,256]{1,0} parameter(0)
  %ar = f32[1024,256]{1,0} all-reduce(%a), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  ROOT %ag = f32[1024,256]{1,0} all-gather(%ar), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
}
"""


def test_each_axis_is_predicted_over_its_own_link():
    chip = chips.chip_for_kind("NVIDIA H100 80GB HBM3")
    mesh = SimpleNamespace(devices=_grid((2, 4), lambda i: i // 4), axis_names=("data", "model"))
    peak = spec_peak("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    p = predict_comm(HLO, mesh, peak)
    full = 1024 * 256 * 4
    assert p.traffic_bytes["data"] == pytest.approx(full * 2 * 1 / 2)  # all-reduce over 2 devices
    assert p.traffic_bytes["model"] == pytest.approx(full * 3 / 4)  # all-gather over 4
    assert p.seconds_by_axis["data"] == pytest.approx(full / (chip.remote_link.gbytes_per_s * 1e9))
    assert p.seconds_by_axis["model"] == pytest.approx(full * 3 / 4 / (450e9))
    assert p.seconds == pytest.approx(p.seconds_by_axis["data"] + p.seconds_by_axis["model"])
    cols = p.axis_columns()
    assert cols["comm_link_data"] == "InfiniBand NDR (crosses hosts)" and cols["comm_link_model"] == "NVLink4"
    # One host: both axes on NVLink, so the same bytes take ~9x less time.
    local = predict_comm(HLO, SimpleNamespace(devices=_grid((2, 4), lambda i: 0), axis_names=("data", "model")),
                         peak)
    assert local.seconds < p.seconds / 5


def test_an_unknown_cross_host_link_leaves_the_prediction_empty_with_a_note():
    mesh = SimpleNamespace(devices=_grid((2, 4), lambda i: i // 4), axis_names=("data", "model"))
    p = predict_comm(HLO, mesh, spec_peak("NVIDIA L4", "gpu", "bfloat16"))  # PCIe cards: no reference network
    assert p.seconds is None and p.seconds_by_axis["data"] is None and "data" in p.note
    assert p.seconds_by_axis["model"] is not None
