"""Links per mesh axis: which axes stay inside a host (or TPU slice) and which cross, and what each predicts."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from jaxscale import chips
from jaxscale.devices import CALIBRATION_VERSION, axis_crossings, mesh_axis_links, spec_peak


def _grid(shape, process_of, slice_of=lambda i: 0, platform="gpu"):
    flat = [SimpleNamespace(id=i, process_index=process_of(i), slice_index=slice_of(i), platform=platform,
                            device_kind="x") for i in range(int(np.prod(shape)))]
    return np.array(flat, dtype=object).reshape(shape)


def test_axis_crossings_of_host_grids():
    hosts = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])  # 2 hosts x 4 devices, hosts along axis 0
    assert axis_crossings(hosts) == [True, False]
    assert axis_crossings(hosts.T) == [False, True]
    assert axis_crossings(np.zeros((4, 2))) == [False, False]
    assert axis_crossings(np.array([[0, 1], [0, 1]])) == [False, True]


def test_gpu_cluster_data_axis_crosses_hosts_model_axis_stays_on_nvlink():
    """4 hosts x 8 H100s, one process per host, mesh (data=4, model=8) as the gpu-cluster profile lays it out."""
    chip = chips.chip_for_kind("NVIDIA H100 80GB HBM3")
    links = mesh_axis_links(_grid((4, 8), lambda i: i // 8), ("data", "model"), "gpu", chip.local_link,
                            chip.remote_link)
    assert links["data"].crosses == "hosts" and links["data"].link.name == "InfiniBand NDR"
    assert links["model"].crosses == "none" and links["model"].link.name == "NVLink4"
    assert links["data"].gbytes_per_s == 50.0 and links["model"].gbytes_per_s == 450.0
    assert "crosses hosts" in links["data"].label
    # fsdp over all 32 GPUs: the one data axis spans the hosts
    flat = mesh_axis_links(_grid((32, 1), lambda i: i // 8), ("data", "model"), "gpu", chip.local_link,
                           chip.remote_link)
    assert flat["data"].crosses == "hosts" and flat["model"].crosses == "none"


def test_tpu_hosts_of_one_slice_share_ici_and_slices_meet_over_dcn():
    chip = chips.chip_for_kind("TPU v5 lite")
    one_slice = mesh_axis_links(_grid((4, 8), lambda i: i // 8, platform="tpu"), ("data", "model"), "tpu",
                                chip.local_link, chip.remote_link)
    assert one_slice["data"].crosses == "none" and one_slice["data"].link.name == "ICI"
    two = mesh_axis_links(_grid((2, 16), lambda i: i // 8, slice_of=lambda i: i // 16, platform="tpu"),
                          ("data", "model"), "tpu", chip.local_link, chip.remote_link)
    assert two["data"].crosses == "slices" and two["data"].link.name == "DCN"
    assert two["data"].gbytes_per_s == pytest.approx(6.4e12 / 8 / 256 / 1e9)  # 6.4 Tbps per 256-chip pod
    assert two["model"].crosses == "none"


def test_a_real_tpu_topology_spans_hosts_inside_one_slice():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see tests/test_comms.py
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:4x4", platform="tpu").devices
    assert {d.device_kind for d in devices} == {"TPU v5 lite"} and len({d.process_index for d in devices}) == 4
    grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(4, 4)
    chip = chips.chip_for_kind(devices[0].device_kind)
    links = mesh_axis_links(grid, ("data", "model"), "tpu", chip.local_link, chip.remote_link)
    assert links["data"].crosses == links["model"].crosses == "none"
    v5p = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    assert chips.chip_for_kind(v5p[0].device_kind).key == "tpu-v5p"  # libtpu reports "TPU v5"


# An all-reduce over the data axis of a (data=2, model=4) mesh and an all-gather over its model axis.
TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                               initialization_timeout=60)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxscale import sharding
    from jaxscale.devices import resolve_peak
    from jaxscale.prediction import predict_comm
    mesh = sharding.make_mesh(2, 2)  # data=2, model=2, as jaxscale lays out a grid point
    x_sh, w_sh = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))), in_shardings=(w_sh, x_sh), out_shardings=w_sh)
    hlo = grad.lower(jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=w_sh),
                     jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=x_sh)).compile().as_text()
    p = predict_comm(hlo, mesh, resolve_peak("float32", measure_if_missing=False))
    if jax.process_index() == 0:
        print(json.dumps({"crosses": {a: l.crosses for a, l in p.links.items()}, "traffic": p.traffic_bytes,
                          "hosts": [[d.process_index for d in row] for row in mesh.devices]}))
""")


def test_two_processes_on_loopback_see_the_data_axis_cross_hosts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAXSCALE_CACHE_DIR": str(tmp_path)}
    # resolve_peak reads a calibration; plant one so no process measures anything.
    key = f"v{CALIBRATION_VERSION}|cpu|cpu|float32|2|{socket.gethostname()}"
    (tmp_path / "calibration.json").write_text(json.dumps({key: {
        "tflops": 1.0, "hbm_gbytes_per_s": 10.0, "interconnect_gbytes_per_s": 5.0, "size": 1, "dtype": "float32",
        "n_local_devices": 2, "measured_at": "planted"}}))
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    assert got["hosts"] == [[0, 0], [1, 1]]
    assert got["crosses"] == {"data": "hosts", "model": "none"}
    assert got["traffic"]["data"] > 0 and got["traffic"]["model"] == 0  # the gradient all-reduce runs over data


def test_a_peak_survives_the_json_round_trip_of_a_worker_report():
    import dataclasses

    from jaxscale.devices import PeakInfo

    peak = spec_peak("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    back = PeakInfo(**json.loads(json.dumps(dataclasses.asdict(peak))))
    assert back == peak and back.remote_link.gbytes_per_s == 50.0


def test_a_topology_that_exposes_each_tensorcore_splits_the_chip():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    from jaxscale.devices import devices_per_chip

    v4 = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices  # 4 chips
    v5p = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices  # 4 chips, megacore
    assert (len(v4), devices_per_chip(v4)) == (8, 2) and (len(v5p), devices_per_chip(v5p)) == (4, 1)
    core = spec_peak("TPU v4", "tpu", "bfloat16", per_chip=2)
    assert core.tflops == 275.0 / 2 and core.hbm_gbytes_per_s == 600.0 and core.memory_bytes == 16 * 2 ** 30
    assert devices_per_chip([SimpleNamespace(process_index=0)]) == 1


@pytest.mark.parametrize("kind, bidirectional_gbytes_per_s, ports", [
    ("TPU v5 lite", 400, 4), ("TPU v5", 1200, 6), ("TPU v6 lite", 800, 4)])
def test_a_mesh_axis_gets_two_ici_ports_of_the_chip(kind, bidirectional_gbytes_per_s, ports):
    """Cloud TPU pages give each chip's ICI both ways over all its ports; a ring along one torus dimension
    sends over 2 ports, one way each."""
    per_port_one_way = bidirectional_gbytes_per_s / 2 / ports
    assert chips.chip_for_kind(kind).local_link.gbytes_per_s == pytest.approx(2 * per_port_one_way)


def test_dcn_per_chip_from_the_pod_figures():
    assert chips.chip_for_kind("TPU v6 lite").remote_link.gbytes_per_s == pytest.approx(25.6e12 / 8 / 256 / 1e9)
    assert chips.chip_for_kind("TPU v5").remote_link.gbytes_per_s == pytest.approx(50e9 / 8 / 1e9)  # 50 Gbps/chip


def test_an_ici_axis_gets_each_torus_dimension_it_spans_and_wraparound_where_the_slice_has_it():
    """JAX scaling book: a v5e slice closes a dimension into a ring only along a full edge of 16 chips
    (16x16 has wraparound, 4x4 and 8x8 do not); v5p along dimensions that are multiples of 4."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    chip = chips.chip_for_kind("TPU v5 lite")
    ici = chip.local_link.gbytes_per_s

    def axis_links(topology, shape):
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        grid = np.array(sorted(devices, key=lambda d: tuple(reversed(d.coords)))).reshape(shape)
        torus = tuple(int(x) for x in topology.split(":")[1].split("x"))
        return mesh_axis_links(grid, ("data", "model"), "tpu", chip.local_link, chip.remote_link, torus)

    pod = axis_links("v5e:16x16", (256, 1))["data"]
    assert pod.gbytes_per_s == 2 * ici and pod.label == "ICI (2 torus dims, wraparound)"
    for topology, n in (("v5e:8x8", 64), ("v5e:4x4", 16)):
        line = axis_links(topology, (n, 1))["data"]
        assert line.gbytes_per_s == ici and line.label == "ICI (2 torus dims, no wraparound)"
    rows = axis_links("v5e:16x16", (16, 16))  # data along one 16-chip edge, model along the other: a ring each
    assert rows["data"].gbytes_per_s == rows["model"].gbytes_per_s == ici
    assert rows["model"].label == "ICI (1 torus dim, wraparound)"
    part = axis_links("v5e:16x16", (64, 4))["model"]  # 4 chips of a 16-chip edge: a line, no ring
    assert part.gbytes_per_s == ici / 2 and part.label == "ICI (1 torus dim, no wraparound)"
    v5p = chips.chip_for_kind("TPU v5")
    devices = topologies.get_topology_desc(topology_name="v5p:4x4x4", platform="tpu").devices
    grid = np.array(sorted(devices, key=lambda d: (tuple(d.coords), d.core_on_chip))).reshape(-1, 1)
    cube = mesh_axis_links(grid, ("data", "model"), "tpu", v5p.local_link, v5p.remote_link, (4, 4, 4))["data"]
    assert cube.gbytes_per_s == 3 * v5p.local_link.gbytes_per_s and "3 torus dims, wraparound" in cube.label


def test_a_calibration_is_measured_saved_and_read_back_as_the_peak(tmp_path, monkeypatch):
    """calibrate() on the 8 CPU devices at a small size, into a cache of its own: its figures are positive and
    bounded by what a CPU core can do, and resolve_peak then reports them as the measured peak."""
    import jax

    from jaxscale import devices

    monkeypatch.setenv("JAXSCALE_CACHE_DIR", str(tmp_path))
    result = devices.calibrate("float32", size=128, repeats=2)
    assert result["n_local_devices"] == jax.local_device_count() == 8 and result["size"] == 128
    assert 0 < result["tflops"] < 10  # per virtual device: a share of a CPU, far below any accelerator
    assert 0 < result["hbm_gbytes_per_s"] < 1000 and 0 < result["interconnect_gbytes_per_s"] < 1000
    (saved,) = json.loads((tmp_path / "calibration.json").read_text()).values()
    assert saved == result
    peak = devices.resolve_peak("float32")
    assert peak.source == "measured" and peak.tflops == result["tflops"]
    assert peak.hbm_gbytes_per_s == result["hbm_gbytes_per_s"] and "128^3 float32 matmul on 8" in peak.reference
