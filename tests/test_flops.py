"""FlopProfile: path costs, expected cost and ideal speedup of an exit profile."""

import pytest

from branchynet.flops import FlopProfile

# Stage costs 10, 20; branch 0 costs 1, the final classifier 5.
PROF = FlopProfile(stage=[10, 20], branch=[1, 5])


def test_expected_and_ideal_speedup_by_hand():
    assert PROF.path(0) == 11 and PROF.path(1) == 10 + 20 + 1 + 5 and PROF.backbone == 35
    assert PROF.expected([0.25, 0.75]) == pytest.approx(0.25 * 11 + 0.75 * 36)
    assert PROF.ideal_speedup([0.25, 0.75]) == pytest.approx(35 / (0.25 * 11 + 0.75 * 36))
    assert PROF.ideal_speedup([0, 1]) == pytest.approx(35 / 36)  # side branch is overhead
    # fractions computed from counts round; they still sum to 1 within 1e-6
    three = FlopProfile(stage=[1, 1, 1], branch=[1, 1, 1])
    assert three.expected([1 / 3] * 3) == pytest.approx((2 + 4 + 6) / 3)


@pytest.mark.parametrize("fractions,msg,ideal_msg", [
    ([0.5, 0.0], r"must sum to 1 .*sum 0\.5", None),    # would halve the cost: twice the speedup
    ([0.5, 0.6], r"must sum to 1 .*sum 1\.1", None),
    ([0.0, 0.0], r"must sum to 1", None),
    ([1.5, -0.5], r"each must be in \[0, 1\]", None),  # sums to 1, still not a profile
    # ideal_speedup's own check (sum > 0) sees the NaN first
    ([float("nan"), 1.0], r"each must be in \[0, 1\]", r"must sum to 1.*nan"),
    ([1.0], r"expected 2 values, got 1", None),
])
def test_expected_refuses_what_is_not_an_exit_profile(fractions, msg, ideal_msg):
    with pytest.raises(ValueError, match=msg):
        PROF.expected(fractions)
    with pytest.raises(ValueError, match=ideal_msg or msg):
        PROF.ideal_speedup(fractions)
