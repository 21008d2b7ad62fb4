"""The per-op roofline and exposed communication (roofline.py), on hand-written schedules with planted
FLOPs, bytes and collective times, and its calibration on planted efficiencies."""

import pytest

from jaxscale import roofline

PEAK, BW = 1e12, 1e10  # FLOP/s and bytes/s: a 64x64x64 f32 dot is 524,288 FLOPs (0.52 µs) and 49,152 bytes (4.9 µs)


def _dot(name, n, extra=""):
    return f"  %{name} = f32[{n},{n}]{{1,0}} dot(%x, %x), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}{extra}\n"


def _program(body: str, params: str = "") -> str:
    return ("HloModule m, is_scheduled=true\n\nENTRY %main (x: f32[64,64]) -> f32[64,64] {\n"
            "  %x = f32[64,64]{1,0} parameter(0)\n" + body + "  ROOT %r = f32[64,64]{1,0} bitcast(%x)\n}\n")


def _matmul(n):
    """(compute s, memory s) of one n×n×n f32 dot: 2n³ FLOPs; reads two n×n operands, writes one."""
    return 2 * n ** 3 / PEAK, 3 * n * n * 4 / BW


def _seconds(table):
    return lambda key: table.get(key, (0.0, ""))


def test_each_kernel_is_bound_by_its_slower_resource_and_kernels_add_up():
    big = "  %y = f32[1024,1024]{1,0} dot(%z, %z), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
    text = _program("  %z = f32[1024,1024]{1,0} broadcast(%x), dimensions={}\n" + big + _dot("a", 64))
    t = roofline.predict(text, PEAK, BW)
    c_big, m_big = _matmul(1024)
    c_small, m_small = _matmul(64)
    broadcast = 1024 * 1024 * 4 / BW + 64 * 64 * 4 / BW  # reads x, writes z
    assert c_big > m_big and c_small < m_small  # one compute-bound kernel, two memory-bound ones
    assert t.roofline_s == pytest.approx(c_big + m_small + broadcast)
    assert t.compute_s == pytest.approx(c_big + c_small) and t.memory_s == pytest.approx(m_big + m_small + broadcast)
    assert t.compute_bound_s == pytest.approx(c_big) and t.memory_bound_s == pytest.approx(m_small + broadcast)
    assert t.step_s == t.roofline_s and t.comm_s == 0 and t.bound == "compute"
    # max(Σ compute, Σ memory), the rule this model replaces, would hide the memory-bound kernels
    assert t.step_s > max(t.compute_s, t.memory_s)
    slow = roofline.predict(text, PEAK, BW, efficiency=roofline.Efficiency(0.5, 0.25))
    assert 4 * m_big > 2 * c_big  # at a quarter of the bandwidth the big dot turns memory-bound
    assert slow.roofline_s == pytest.approx(4 * (m_big + m_small + broadcast))


ASYNC = """  %ags = (f32[64,64]{1,0}, f32[1024,64]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[1,16]<=[16], dimensions={0}
""" + _dot("a", 64) + _dot("b", 64) + """  %agd = f32[1024,64]{1,0} all-gather-done(%ags)
  %ar = f32[64,64]{1,0} all-reduce(%x), channel_id=2, replica_groups=[1,16]<=[16], to_apply=%add
"""


@pytest.mark.parametrize("gather_s", [2e-6, 30e-6])
def test_an_async_collective_costs_only_what_outlasts_the_kernels_it_overlaps(gather_s):
    reduce_s = 7e-6
    t = roofline.predict(_program(ASYNC), PEAK, BW, _seconds({"1": (gather_s, "data"), "2": (reduce_s, "data")}))
    between = 2 * max(*_matmul(64))
    assert t.roofline_s == pytest.approx(between)
    assert t.comm_s == pytest.approx(gather_s + reduce_s)
    assert t.exposed_comm_s == pytest.approx(max(0.0, gather_s - between) + reduce_s)  # the all-reduce in full
    assert t.step_s == pytest.approx(t.roofline_s + t.exposed_comm_s)
    assert t.overlapped_s == pytest.approx(max(t.roofline_s, t.comm_s))
    assert t.exposed_s == pytest.approx(t.roofline_s + t.comm_s)
    assert t.overlapped_s <= t.step_s <= t.exposed_s
    assert t.bound == ("communication" if gather_s > between else "memory")


def test_collectives_on_one_link_queue_and_on_two_links_do_not():
    two = """  %s1 = (f32[64,64]{1,0}, f32[1024,64]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[1,16]<=[16], dimensions={0}
  %s2 = (f32[64,64]{1,0}, f32[1024,64]{1,0}) all-gather-start(%x), channel_id=2, replica_groups=[1,16]<=[16], dimensions={0}
""" + _dot("a", 64) + """  %d1 = f32[1024,64]{1,0} all-gather-done(%s1)
  %d2 = f32[1024,64]{1,0} all-gather-done(%s2)
"""
    window = max(*_matmul(64))
    same = roofline.predict(_program(two), PEAK, BW, _seconds({"1": (8e-6, "data"), "2": (8e-6, "data")}))
    assert same.exposed_comm_s == pytest.approx(16e-6 - window)
    apart = roofline.predict(_program(two), PEAK, BW, _seconds({"1": (8e-6, "data"), "2": (8e-6, "model")}))
    assert apart.exposed_comm_s == pytest.approx(8e-6 - window)


def _pipelined_loop() -> str:
    """A loop body that waits for the previous trip's transfer, runs a transfer of its own, and starts the next."""
    pair = "(f32[64,64]{1,0}, f32[64,64]{1,0})"
    return f"""HloModule m, is_scheduled=true

%body (p: (s32[], f32[64,64], {pair})) -> (s32[], f32[64,64], {pair}) {{
  %p = (s32[], f32[64,64]{{1,0}}, {pair}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,64]{{1,0}} get-tuple-element(%p), index=1
  %prev = {pair} get-tuple-element(%p), index=2
  %got = f32[64,64]{{1,0}} collective-permute-done(%prev)
  %s0 = {pair} collective-permute-start(%x), channel_id=5, source_target_pairs={{{{0,1}},{{1,0}}}}
  %d0 = f32[64,64]{{1,0}} collective-permute-done(%s0)
""" + _dot("a", 64) + _dot("b", 64) + f"""  %st = {pair} collective-permute-start(%a), channel_id=6, source_target_pairs={{{{0,1}},{{1,0}}}}
""" + _dot("c", 64) + f"""  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,64]{{1,0}}, {pair}) tuple(%next, %c, %st)
}}

%cond (p: (s32[], f32[64,64], {pair})) -> pred[] {{
  %p = (s32[], f32[64,64]{{1,0}}, {pair}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main (x: f32[64,64]) -> f32[64,64] {{
  %x = f32[64,64]{{1,0}} parameter(0)
  %first = {pair} collective-permute-start(%x), channel_id=6, source_target_pairs={{{{0,1}},{{1,0}}}}
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,64]{{1,0}}, {pair}) tuple(%zero, %x, %first)
  %w = (s32[], f32[64,64]{{1,0}}, {pair}) while(%init), condition=%cond, body=%body
  %last = {pair} get-tuple-element(%w), index=2
  %end = f32[64,64]{{1,0}} collective-permute-done(%last)
  ROOT %r = f32[64,64]{{1,0}} get-tuple-element(%w), index=1
}}
"""


def test_a_collective_waited_for_in_the_next_trip_overlaps_both_sides_of_the_loops_back_edge():
    """A pipelined loop starts a transfer late in a trip and waits for it early in the next (the start travels
    through the loop state); another transfer starts and ends inside the trip."""
    text = _pipelined_loop()
    kernel = max(*_matmul(64))
    for seconds in (0.5 * kernel, 5 * kernel):
        t = roofline.predict(text, PEAK, BW, _seconds({"5": (seconds, "data"), "6": (seconds, "model")}))
        assert t.roofline_s == pytest.approx(4 * 3 * kernel)
        # per trip: the in-trip permute has nothing to hide behind; the back-edge one hides behind the last dot
        assert t.exposed_comm_s == pytest.approx(4 * (seconds + max(0.0, seconds - kernel)))


def test_calibration_recovers_planted_efficiencies():
    mixes = []
    for n_big, n_small in ((1, 1), (1, 6), (2, 12)):  # compute-heavy to memory-heavy
        body = "  %z = f32[512,512]{1,0} broadcast(%x), dimensions={}\n"
        body += "".join(f"  %y{i} = f32[512,512]{{1,0}} dot(%z, %z), lhs_contracting_dims={{1}}, "
                        f"rhs_contracting_dims={{0}}\n" for i in range(n_big))
        body += "".join(_dot(f"s{i}", 64) for i in range(n_small))
        mixes.append(roofline.Schedule.from_hlo(_program(body)))
    truth = roofline.Efficiency(0.6, 0.8)
    samples = [roofline.Sample.of_schedule(s, PEAK, BW, s.predict(PEAK, BW, truth).step_s) for s in mixes]
    fitted = roofline.fit_efficiency(samples, "planted")
    assert (fitted.compute, fitted.memory) == (pytest.approx(0.6, rel=1e-3), pytest.approx(0.8, rel=1e-3))
    # one measured step cannot separate the two: one factor for both, matching that step exactly
    one = roofline.fit_efficiency(samples[:1], "planted")
    assert one.compute == one.memory and "one factor" in one.source
    assert mixes[0].predict(PEAK, BW, one).step_s == pytest.approx(samples[0].measured_s, rel=1e-6)
    # a measured row's own terms (each kernel keeping its bound) scale as its schedule does
    used = roofline.Efficiency(0.5, 0.9)
    t = mixes[1].predict(PEAK, BW, used)
    row = roofline.Sample.of_terms(t.compute_bound_s, t.memory_bound_s, t.exposed_comm_s, used, 1.0)
    half = roofline.Efficiency(0.25, 0.45)
    assert sum(row.terms(half)) == pytest.approx(mixes[1].predict(PEAK, BW, half).step_s, rel=1e-9)


def test_efficiencies_outside_a_fraction_are_refused():
    for bad in (0.0, -0.5, 2.0, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            roofline.Efficiency(bad, 1.0)
