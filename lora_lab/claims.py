"""Verdicts on quantitative claims: does a computed value bear a claim out?"""

HOLDS, LOOSE, WRONG = "holds", "loose", "wrong"


def judge(value, claimed, *, rel_tol=0.10, loose_factor=2.0):
    """``holds`` if ``value`` is within ``rel_tol`` of ``claimed`` (or inside a claimed
    ``(low, high)`` range), ``loose`` if within a factor ``loose_factor`` of it, else ``wrong``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a number, got {type(value).__name__} {value!r}")
    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol!r}")
    if not loose_factor >= 1:
        raise ValueError(f"loose_factor must be at least 1, got {loose_factor!r}")
    low, high = _bounds(claimed)
    if low * (1 - rel_tol) <= value <= high * (1 + rel_tol):
        return HOLDS
    if low / loose_factor <= value <= high * loose_factor:
        return LOOSE
    return WRONG


def _bounds(claimed):
    if isinstance(claimed, tuple):
        if len(claimed) != 2 or not claimed[0] <= claimed[1]:
            raise ValueError(f"claimed range must be (low, high) with low <= high, got {claimed!r}")
        low, high = claimed
    else:
        low = high = claimed
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
            raise ValueError(f"claimed values must be positive numbers, got {claimed!r}")
    return low, high
