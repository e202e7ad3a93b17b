"""lora_lab.measure's timer: interleaved samples, the order alternating, one statistic."""

import itertools

import pytest

from lora_lab.measure import compare, interleaved_times, median


def test_interleaved_times_alternates_the_order_and_warms_up():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(fns, samples=3, calls=2, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("aabbcc") + list("ccbbaa") + list("aabbcc")


def test_interleaved_times_uses_the_clock_per_call():
    ticks = itertools.count()  # every reading one unit later
    times = interleaved_times(
        {"a": lambda: None}, samples=2, calls=4, warmup=0, clock=lambda: next(ticks)
    )
    assert times == {"a": [0.25, 0.25]}  # one unit between the readings, over 4 calls


def test_median_and_compare():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median({"a": [1.0, 5.0, 2.0], "b": [4.0]}) == {"a": 2.0, "b": 4.0}
    a, b, ratio = compare(lambda: None, lambda: None, samples=3, warmup=0)
    assert a >= 0 and b >= 0 and ratio > 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"fns": {}, "samples": 1}, TypeError),
        ({"fns": {"a": 1}, "samples": 1}, TypeError),
        ({"fns": {"a": print}, "samples": 0}, ValueError),
        ({"fns": {"a": print}, "samples": 1, "warmup": -1}, ValueError),
    ],
)
def test_interleaved_times_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        interleaved_times(**kwargs)
