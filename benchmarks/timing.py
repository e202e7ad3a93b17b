"""Interleaved timing shared by the benchmarks."""

import time


def interleaved_times(fn_a, fn_b, samples, calls, warmup):
    """Seconds per call of ``fn_a`` and ``fn_b``: two lists of ``samples`` paired samples.

    Each sample times ``calls`` calls of one side and then of the other, alternating which
    goes first, so a burst of load from other processes hits both sides of a pair alike.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for i in range(samples):
        order = ((fn_a, times_a), (fn_b, times_b))
        for fn, out in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - start) / calls)
    return times_a, times_b
