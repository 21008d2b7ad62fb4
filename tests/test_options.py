"""The command line's options: how they combine where argparse cannot say."""

import pytest

from jaxscale.config import BadInput
from jaxscale.options import build_parser, compare_sides


def test_compare_sides_come_as_base_new_or_as_repeated_flags_never_a_mix():
    assert compare_sides(["a", "b"], [], []) == (["a"], ["b"])
    assert compare_sides([], ["a", "c"], ["b"]) == (["a", "c"], ["b"])
    with pytest.raises(BadInput, match="not a mix"):
        compare_sides(["a"], ["b"], ["c"])
    with pytest.raises(BadInput, match="not a mix"):
        compare_sides([], ["a"], [])  # --base without --new
    with pytest.raises(BadInput, match=r"two reports, BASE NEW \(got 3\)"):
        compare_sides(["a", "b", "c"], [], [])


def test_repeated_options_collect_and_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["compare", "--base", "a", "--base", "b", "--new", "c"])
    assert args.command == "compare" and args.base == ["a", "b"] and args.new == ["c"] and args.reports == []
    assert args.threshold == 0.05 and args.confidence == 0.95 and not args.per_point
    run = build_parser().parse_args(["run", "--set", "a.b=1", "--set", "c.d=2"])
    assert run.profile is None and run.set == ["a.b=1", "c.d=2"] and run.distributed == "auto" and run.timeout == 120
