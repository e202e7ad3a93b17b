"""Verdicts on the lesson's quantitative claims: one vocabulary, one rule per kind of claim.

Every verdict in the course (the claims page, and the chapters that judge a claim) is one of
the four words of ``VERDICTS``; ``RULES`` says, once, when each applies. A claim is one of four
kinds, and each kind has its judge:

- a number, "about 14 GB", or a range, "0.1-1%": ``judge`` (10% either side, then a factor 2);
  the same claim at several settings of the lesson: ``judge_sweep`` (its worst setting);
- a count, "65,536 trainable parameters": ``judge_count`` (equal, or wrong: a count that differs
  is a bug, not an approximation);
- a bound, "80 GB+", "fits in 24 GB", "within 1-2%": ``judge_bound`` (met, within a factor 2, or
  neither);
- a direction, "faster", "a higher learning rate": ``judge_direction`` on the ratio of the two
  sides (beyond a 10% margin, inside it, or the other way); measured over seeds, "scores
  higher": ``judge_better``, which also asks the gap to exceed twice its standard error;
- a recommended setting or range ("rank 8-64", "q_proj and v_proj"), on a grid of runs over
  seeds: ``judge_choice`` (the best setting or tied with it, else how far behind);
- a statement, true or false: ``judge_statement``.

``ClaimTable`` collects the verdicts of a page with the function (or the cell) that computed
each value, and draws every numeric claim's computed value against the claimed one.
"""

import math
import numbers
from dataclasses import dataclass

HOLDS, LOOSE, WRONG, NOT_MEASURED = "holds", "loose", "wrong", "not measured here"
VERDICTS = (HOLDS, LOOSE, WRONG, NOT_MEASURED)
REL_TOL = 0.10  # a number within 10% of the claim holds
LOOSE_FACTOR = 2.0  # ... and within a factor of 2 of it is loose
COLORS = {HOLDS: "#5cb85c", LOOSE: "#f0ad4e", WRONG: "#d9534f", NOT_MEASURED: "#999999"}

RULES = {
    HOLDS: "a number within 10% of the claim, or inside a claimed range widened by 10% at each "
    "end; at every setting of a sweep; a count equal to the claim; a bound that is met; a "
    "direction beyond a 10% margin (over seeds, also beyond twice the standard error of the "
    "difference); a recommended setting that is the best of a grid of runs over "
    "seeds or tied with it (within twice the standard error of the difference), or scores within "
    "10% of it; a true statement",
    LOOSE: "a number outside that, but within a factor of 2 of the claim (or of the range); a "
    "sweep whose worst setting is loose; a bound missed by less than a factor of 2; a "
    "direction inside the 10% margin (no difference beyond it) or, over seeds, within twice the "
    "standard error of the difference; a recommended setting whose "
    "score is within a factor of 2 of the best's",
    WRONG: "a number off by a factor of 2 or more; a count that differs (a bug); a bound missed "
    "by a factor of 2 or more; a direction reversed by more than the margin; a recommended "
    "setting that scores a factor of 2 or more worse than the best; a false statement",
    NOT_MEASURED: "nothing the course has run can judge it (for example a GPU measurement that "
    "has not been made); an estimate may be shown beside it, never a verdict",
}


# ----------------------------------------------------------------------------- the judges


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_tolerances(rel_tol, loose_factor):
    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol!r}")
    if not loose_factor >= 1:
        raise ValueError(f"loose_factor must be at least 1, got {loose_factor!r}")


def judge(value, claimed, *, rel_tol=REL_TOL, loose_factor=LOOSE_FACTOR):
    """``holds`` if ``value`` is within ``rel_tol`` of ``claimed`` (or inside a claimed
    ``(low, high)`` range), ``loose`` if within a factor ``loose_factor`` of it, else ``wrong``.
    """
    value = _number("value", value)
    _check_tolerances(rel_tol, loose_factor)
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


def worst(verdicts):
    """The worst of several verdicts on one claim (wrong, then loose, then holds)."""
    verdicts = list(verdicts)
    for v in verdicts:
        if v not in (HOLDS, LOOSE, WRONG):
            raise ValueError(f"verdicts must be holds, loose or wrong, got {v!r}")
    if not verdicts:
        raise ValueError("verdicts must hold at least one verdict, got none")
    return max(verdicts, key=(HOLDS, LOOSE, WRONG).index)


def judge_sweep(values, claimed, *, rel_tol=REL_TOL, loose_factor=LOOSE_FACTOR):
    """The verdict of ``judge`` at the worst of ``values``: a claim about "typical" settings,
    checked at every setting the lesson itself names, holds only if it holds at all of them."""
    values = list(values)
    if not values:
        raise ValueError("values must hold at least one computed value, got none")
    return worst(judge(v, claimed, rel_tol=rel_tol, loose_factor=loose_factor) for v in values)


def judge_count(value, claimed):
    """``holds`` if the count equals the claim, else ``wrong``: a count has no tolerance."""
    for name, n in (("value", value), ("claimed", claimed)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an integer count, got {type(n).__name__} {n!r}")
    return HOLDS if value == claimed else WRONG


def judge_bound(value, *, at_least=None, at_most=None, loose_factor=LOOSE_FACTOR):
    """``holds`` if ``at_least <= value <= at_most`` (either may be None), ``loose`` if the
    bound is missed by less than a factor ``loose_factor``, else ``wrong``."""
    value = _number("value", value)
    _check_tolerances(0, loose_factor)
    if at_least is None and at_most is None:
        raise ValueError("judge_bound needs at_least, at_most or both; got neither")
    low, high = (
        None if b is None else _number(n, b)
        for n, b in (("at_least", at_least), ("at_most", at_most))
    )
    for name, bound in (("at_least", low), ("at_most", high)):
        if bound is not None and bound <= 0:
            raise ValueError(f"{name} must be positive, got {bound!r}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"at_least must not exceed at_most, got {at_least!r} > {at_most!r}")
    low_ok, high_ok = low is None or value >= low, high is None or value <= high
    if low_ok and high_ok:
        return HOLDS
    near = (low is None or value >= low / loose_factor) and (
        high is None or value <= high * loose_factor
    )
    return LOOSE if near else WRONG


def judge_direction(ratio, *, margin=REL_TOL):
    """A claim "A is more than B" (faster, higher) judged on ``ratio`` = A / B: ``holds`` if
    it is at least ``1 + margin``, ``loose`` within the margin of 1, ``wrong`` below
    ``1 - margin`` (the other way round)."""
    ratio = _number("ratio", ratio)
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio!r}")
    if not 0 < margin < 1:
        raise ValueError(f"margin must be in (0, 1), got {margin!r}")
    if ratio >= 1 + margin:
        return HOLDS
    return LOOSE if ratio >= 1 - margin else WRONG


def grid_summary(scores):
    """``{setting: (mean, sd, n)}`` of a grid of runs: ``scores`` maps each setting to the
    score of each seed (lower is better; None for a run that diverged: infinitely bad)."""
    import statistics

    if not isinstance(scores, dict) or not scores:
        raise ValueError(
            f"scores must be a non-empty dict {{setting: [score of each seed]}}, got {scores!r}"
        )
    out = {}
    for setting, seeds in scores.items():
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ValueError(f"scores[{setting!r}] must be a non-empty list, got {seeds!r}")
        if any(v is None for v in seeds):
            out[setting] = (math.inf, 0.0, len(seeds))
            continue
        values = [_number(f"scores[{setting!r}]", v) for v in seeds]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out[setting] = (statistics.fmean(values), sd, len(values))
    return out


def best_setting(scores):
    """The setting with the lowest mean score, and every setting tied with it: whose mean is
    within twice the standard error of the difference, ``2 sqrt(sd1**2/n1 + sd2**2/n2)``
    (chapters 8 and 9: a difference smaller than that is not a result)."""
    summary = grid_summary(scores)
    best = min(summary, key=lambda s: summary[s][0])
    mean, sd, n = summary[best]
    tied = [
        s for s, (m, d, k) in summary.items() if m - mean <= 2 * math.sqrt(sd**2 / n + d**2 / k)
    ]
    return best, tied


def judge_better(a, b, *, margin=REL_TOL):
    """A claim "A scores higher than B" over seeds, from two ``experiments.seed_stats``.

    ``judge_direction`` on the ratio of the means, except that a mean gap within twice its
    standard error is ``loose`` whatever the ratio: those seeds cannot tell A from B.
    """
    for name, stats in (("a", a), ("b", b)):
        if not isinstance(stats, dict) or not {"mean", "sd", "n"} <= set(stats):
            raise ValueError(f"{name} must be seed_stats (mean, sd, n...), got {stats!r}")
    gap = a["mean"] - b["mean"]
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    if abs(gap) <= 2 * se:
        return LOOSE
    if b["mean"] <= 0:
        return HOLDS if gap > 0 else WRONG
    if a["mean"] <= 0:
        return WRONG
    return judge_direction(a["mean"] / b["mean"], margin=margin)


def judge_choice(scores, claimed, *, rel_tol=REL_TOL, loose_factor=LOOSE_FACTOR):
    """A recommended setting or range judged on a grid of runs over seeds (lower score is
    better, e.g. a loss): ``holds`` if a setting of ``claimed`` (the grid's settings the claim
    recommends) is the best or tied with it (``best_setting``); otherwise ``judge`` of the best
    claimed setting's mean against the best's: within 10% holds, within a factor 2 loose."""
    claimed = list(claimed)
    summary = grid_summary(scores)
    missing = [c for c in claimed if c not in summary]
    if not claimed or missing:
        raise ValueError(
            f"claimed must name settings of the grid {sorted(summary, key=str)}, got {claimed!r}"
        )
    best, tied = best_setting(scores)
    if any(c in tied for c in claimed):
        return HOLDS
    ours = min(summary[c][0] for c in claimed)
    if not math.isfinite(ours):
        return WRONG
    return judge(ours, summary[best][0], rel_tol=rel_tol, loose_factor=loose_factor)


def judge_statement(true):
    """``holds`` if a computed statement is true, ``wrong`` if false."""
    if type(true).__name__ not in ("bool", "bool_"):  # Python's bool or numpy's
        raise TypeError(f"true must be a bool computed from a measurement, got {true!r}")
    return HOLDS if bool(true) else WRONG


# ----------------------------------------------------------------------------- a page's claims


def source_name(source):
    """The name a table shows for ``source``: ``module.qualname`` of a function, or the text
    naming a cell."""
    if callable(source):
        func = getattr(source, "__func__", source)  # a bound method: its function
        module = getattr(func, "__module__", None)
        qualname = getattr(func, "__qualname__", None)
        if not module or not qualname:
            raise TypeError(f"source must be a named function, got {source!r}")
        return f"{module}.{qualname}"
    if isinstance(source, str) and source.strip():
        return source
    raise TypeError(f"source must be a function or the text naming a cell, got {source!r}")


@dataclass(frozen=True)
class Claim:
    """One claim of the lesson, what the course computed for it, and the verdict."""

    claim: str  # what is claimed, and for which setting
    lesson: str  # the lesson's words
    computed: str  # the value, as shown
    verdict: str
    source: str  # the function (module.qualname) or cell that computed the value
    why: str
    chapter: str  # where the course explains it
    claimed: object = None  # a number or (low, high) (either end None for a bound): the figure's
    values: tuple = ()  # the computed numbers, in the claim's units
    point_verdicts: tuple = ()  # a sweep: the verdict at each of ``values`` (the figure's colours)


class ClaimTable:
    """The claims of one page, in the order they are added."""

    COLUMNS = ("claim", "lesson", "computed", "verdict", "source", "why", "chapter")

    def __init__(self):
        self.claims = []

    def add(self, claim, lesson, *, computed, verdict, source, why="", chapter="",
            claimed=None, values=(), point_verdicts=()):  # fmt: skip
        """Record one verdict; returns it. ``source`` is the function that computed the value
        (shown as module.qualname) or the text naming the cell that did; ``point_verdicts``, for a
        sweep, the verdict at each of ``values``."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {verdict!r}")
        if isinstance(values, numbers.Real):
            values = (values,)
        values = tuple(_number("values", v) for v in values)
        point_verdicts = tuple(point_verdicts)
        if point_verdicts and len(point_verdicts) != len(values):
            raise ValueError(
                f"point_verdicts must give one verdict per value: {len(point_verdicts)} "
                f"for {len(values)} values"
            )
        for v in point_verdicts:
            if v not in VERDICTS:
                raise ValueError(f"point_verdicts must be among {list(VERDICTS)}, got {v!r}")
        if claimed is not None:
            _claimed_ends(claimed)
        self.claims.append(Claim(str(claim), str(lesson), str(computed), verdict,
                                 source_name(source), str(why), str(chapter), claimed, values,
                                 point_verdicts))  # fmt: skip
        return verdict

    def __len__(self):
        return len(self.claims)

    def frame(self, columns=COLUMNS):
        """A pandas DataFrame, one row per claim."""
        import pandas as pd

        return pd.DataFrame([{c: getattr(x, c) for c in columns} for x in self.claims])

    def counts(self):
        """``{verdict: number of claims}`` for every verdict word, zeros included."""
        return {v: sum(c.verdict == v for c in self.claims) for v in VERDICTS}

    def styled(self, columns=COLUMNS):
        """The table with each verdict cell coloured by its verdict."""
        return (
            self.frame(columns)
            .style.apply(
                lambda col: [f"background-color: {COLORS[v]}40" for v in col], subset=["verdict"]
            )  # fmt: skip
            .hide(axis="index")
        )

    def plot(self, ax=None):
        """Computed against claimed for every claim with numbers, on a log scale: each row is
        divided by its claim (a range by its low end, an "at most" bound by its limit), the
        claim drawn in grey, each computed value as a dot coloured by its verdict (a sweep's
        dots by their own). Values of 0 or below have no place on a log scale and are left out."""
        import matplotlib.pyplot as plt

        rows = [c for c in self.claims if c.claimed is not None and any(v > 0 for v in c.values)]
        if not rows:
            raise ValueError("no claim has both a claimed value and computed values to plot")
        if ax is None:
            _, ax = plt.subplots(figsize=(11, 0.34 * len(rows) + 1.4))
        ratios = [v / _claimed_ref(c.claimed) for c in rows for v in c.values if v > 0]
        lo, hi = min(ratios + [0.5]) / 1.5, max(ratios + [2.0]) * 1.5
        for i, c in enumerate(rows):
            low, high = _claimed_ends(c.claimed)
            ref = _claimed_ref(c.claimed)
            left = lo if low is None else low / ref
            right = hi if high is None else high / ref
            if right > left * 1.0001:
                ax.barh(i, right - left, left=left, height=0.6, color="0.85", zorder=1)
            else:
                ax.plot([left, left], [i - 0.3, i + 0.3], color="0.5", lw=2, zorder=1)
            shown = [(v / ref, p) for v, p in zip(c.values, c.point_verdicts or [c.verdict] * len(c.values),
                                                  strict=True) if v > 0]  # fmt: skip
            xs, colors = [x for x, _ in shown], [COLORS[p] for _, p in shown]
            ax.scatter(xs, [i] * len(xs), s=28, color=colors, edgecolor="black", linewidth=0.5,
                       zorder=3)  # fmt: skip
        ax.set_yticks(range(len(rows)), [f"{c.claim} ({c.lesson})" for c in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvline(1, color="0.4", lw=0.8, ls=":", zorder=0)
        ax.set_xlabel("computed / claimed (a range: / its low end; log scale)")
        handles = [plt.Line2D([], [], marker="o", ls="", color=COLORS[v], markeredgecolor="black",
                              label=v) for v in (HOLDS, LOOSE, WRONG)]  # fmt: skip
        handles.append(plt.Rectangle((0, 0), 1, 1, color="0.85", label="the claim"))
        ax.legend(handles=handles, loc="lower right", fontsize=8)
        return ax


def _claimed_ends(claimed):
    """(low, high) of a claim: a number (both ends), or a tuple whose ends may be None."""
    if isinstance(claimed, tuple):
        if len(claimed) != 2 or claimed == (None, None):
            raise ValueError(f"claimed must be (low, high), one end possibly None, got {claimed!r}")
        low, high = claimed
    else:
        low = high = claimed
    for end in (low, high):
        if end is not None and (_number("claimed", end) <= 0):
            raise ValueError(f"claimed values must be positive, got {claimed!r}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"claimed range must have low <= high, got {claimed!r}")
    return low, high


def _claimed_ref(claimed):
    low, high = _claimed_ends(claimed)
    return low if low is not None else high


__all__ = [
    "COLORS",
    "HOLDS",
    "LOOSE",
    "NOT_MEASURED",
    "RULES",
    "VERDICTS",
    "WRONG",
    "Claim",
    "ClaimTable",
    "best_setting",
    "grid_summary",
    "judge_choice",
    "judge",
    "judge_bound",
    "judge_count",
    "judge_better",
    "judge_direction",
    "judge_statement",
    "judge_sweep",
    "source_name",
    "worst",
]
