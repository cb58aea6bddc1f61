import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from infer_plan.core.admission import admit_burst, zone_admits


def sequential(tiers, depth, thresholds):
    mask = []
    for tier in tiers:
        ok = zone_admits(int(tier), depth, thresholds)
        mask.append(ok)
        depth += ok
    return np.array(mask, dtype=bool), depth


def test_zones_shed_free_then_paid_then_all():
    thresholds = (2, 4, 6)
    assert [zone_admits(t, 1, thresholds) for t in range(3)] == [True, True, True]
    assert [zone_admits(t, 2, thresholds) for t in range(3)] == [True, True, False]
    assert [zone_admits(t, 4, thresholds) for t in range(3)] == [True, False, False]
    assert [zone_admits(t, 6, thresholds) for t in range(3)] == [False, False, False]


@settings(max_examples=400, deadline=None)
@given(
    tiers=st.lists(st.integers(0, 2), min_size=1, max_size=60),
    depth=st.integers(0, 30),
    yellow=st.integers(1, 12),
    extra_red=st.integers(0, 8),
    extra_full=st.integers(0, 8),
)
def test_burst_admission_equals_request_by_request(tiers, depth, yellow, extra_red, extra_full):
    thresholds = (yellow, yellow + extra_red, yellow + extra_red + extra_full)
    arr = np.array(tiers, dtype=np.int8)
    mask, end_depth = admit_burst(arr, depth, thresholds)
    expected_mask, expected_depth = sequential(arr, depth, thresholds)
    assert mask.tolist() == expected_mask.tolist()
    assert end_depth == expected_depth
