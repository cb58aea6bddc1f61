"""The dispatch decision on cases small enough to check by hand (SPEC section 2)."""

import math

import pytest
from infer_plan.core import DispatchRule, ServiceModel, Take, Wait, decide, take_by_priority

RULE = DispatchRule(max_batch=100, max_wait_s=0.040)


@pytest.mark.parametrize(
    ("queued", "oldest", "now", "gpu_free", "expected"),
    [
        (0, math.inf, 5.0, True, Wait(math.inf)),  # nothing queued: nothing is due until something arrives
        (1, 1.000, 1.000, True, Wait(1.040)),  # a lone request waits for its deadline
        (1, 1.000, 1.039, True, Wait(1.040)),
        (1, 1.000, 1.040, True, Take(1)),  # ... and leaves at it, exactly
        (37, 1.000, 1.100, True, Take(37)),  # past the deadline: everything queued
        (100, 1.000, 1.000, True, Take(100)),  # a full batch leaves at once
        (250, 1.000, 1.000, True, Take(100)),  # never more than max_batch
        (250, 1.000, 9.000, False, Wait(math.inf)),  # no free GPU: wait for one, however late it is
        (1, 1.000, 1.040 - 1e-12, True, Take(1)),  # float noise at the deadline does not delay a due batch
    ],
)
def test_decide(queued, oldest, now, gpu_free, expected):
    assert decide(RULE, queued, oldest, now, gpu_free) == expected


def test_zero_wait_sends_every_request_at_once():
    assert decide(DispatchRule(max_batch=100, max_wait_s=0.0), 3, 2.0, 2.0, True) == Take(3)


@pytest.mark.parametrize(
    ("depths", "n", "expected"),
    [
        ([3, 4, 5], 12, [3, 4, 5]),
        ([3, 4, 5], 5, [3, 2, 0]),  # enterprise first, then paid
        ([0, 0, 9], 4, [0, 0, 4]),
        ([10, 0, 1], 10, [10, 0, 0]),  # enterprise fills the batch; free waits
        ([0, 0, 0], 0, [0, 0, 0]),
    ],
)
def test_take_by_priority(depths, n, expected):
    assert take_by_priority(depths, n) == expected


def test_the_model_gives_the_rule_in_seconds():
    assert ServiceModel(max_batch=64, max_wait_ms=25).dispatch_rule == DispatchRule(max_batch=64, max_wait_s=0.025)
