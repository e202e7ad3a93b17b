"""lora_lab.claims.judge: the thresholds behind the claims page's verdicts."""

import pytest

from lora_lab.claims import HOLDS, LOOSE, WRONG, judge


@pytest.mark.parametrize(
    ("value", "claimed", "verdict"),
    [
        (112.0, 112, HOLDS),
        (107.8, 112, HOLDS),  # 3.8% under, inside the default 10%
        (16.9, 14, LOOSE),  # 21% over
        (7.3, 4, LOOSE),
        (16.8, 100, WRONG),  # about 6x under
        (0.124, (0.1, 1.0), HOLDS),
        (1.5, (0.1, 1.0), LOOSE),
        (3.9, (0.1, 1.0), WRONG),
        (803.0, (100, 1000), HOLDS),
        (1.0, (100, 1000), WRONG),
    ],
)
def test_verdicts(value, claimed, verdict):
    assert judge(value, claimed) == verdict


def test_exact_claims_use_zero_tolerance():
    assert judge(65_536, 65_536, rel_tol=0) == HOLDS
    assert judge(69_632, 65_536, rel_tol=0) == LOOSE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value": "7", "claimed": 7}, "value must be a number"),
        ({"value": 1.0, "claimed": (3, 2)}, "low <= high"),
        ({"value": 1.0, "claimed": -1}, "positive"),
        ({"value": 1.0, "claimed": 1, "rel_tol": 1.5}, "rel_tol"),
        ({"value": 1.0, "claimed": 1, "loose_factor": 0.5}, "loose_factor"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        judge(**kwargs)
