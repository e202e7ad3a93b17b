"""lora_lab.claims: the verdict rules, the claim table, and the claims page's sources."""

import ast
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from lora_lab.claims import (
    HOLDS,
    LOOSE,
    NOT_MEASURED,
    RULES,
    VERDICTS,
    WRONG,
    ClaimTable,
    best_setting,
    grid_summary,
    judge,
    judge_better,
    judge_bound,
    judge_choice,
    judge_count,
    judge_direction,
    judge_statement,
    judge_sweep,
    source_name,
)

PAGE = Path(__file__).resolve().parents[1] / "notebooks" / "claims.ipynb"
MIN_CLAIMS = 40  # rows of the committed table

# ----------------------------------------------------------------------------- the rules


def test_every_verdict_has_one_rule():
    assert set(RULES) == set(VERDICTS) == {HOLDS, LOOSE, WRONG, NOT_MEASURED}
    assert all(len(rule) > 40 for rule in RULES.values())


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
def test_judge(value, claimed, verdict):
    assert judge(value, claimed) == verdict


def test_judge_sweep_is_its_worst_setting():
    assert judge_sweep([0.2, 0.5, 0.99], (0.1, 1.0)) == HOLDS
    assert judge_sweep([0.062, 0.5, 0.99], (0.1, 1.0)) == LOOSE  # one setting below the range
    assert judge_sweep([0.5, 2.4], (0.1, 1.0)) == WRONG  # one setting far above it
    assert judge_sweep([1600.0, 100.0], (100, 1000)) == LOOSE


def test_counts_have_no_tolerance():
    assert judge_count(65_536, 65_536) == HOLDS
    assert judge_count(69_632, 65_536) == WRONG  # 6% off: a bug, not an approximation
    with pytest.raises(TypeError, match="integer count"):
        judge_count(65_536.0, 65_536)


@pytest.mark.parametrize(
    ("value", "kwargs", "verdict"),
    [
        (110.9, {"at_least": 80}, HOLDS),
        (56.0, {"at_least": 80}, LOOSE),
        (30.0, {"at_least": 80}, WRONG),
        (16.9, {"at_most": 25.8}, HOLDS),
        (40.0, {"at_most": 25.8}, LOOSE),
        (60.0, {"at_most": 25.8}, WRONG),
        (-1.5, {"at_most": 2}, HOLDS),  # LoRA ahead of full fine-tuning: within any margin
        (3.1, {"at_most": 2}, LOOSE),
        (5.0, {"at_most": 2}, WRONG),
        (5.0, {"at_least": 1, "at_most": 10}, HOLDS),
    ],
)
def test_judge_bound(value, kwargs, verdict):
    assert judge_bound(value, **kwargs) == verdict


@pytest.mark.parametrize(
    ("ratio", "verdict"), [(1.41, HOLDS), (1.10, HOLDS), (1.04, LOOSE), (0.95, LOOSE), (0.7, WRONG)]
)
def test_judge_direction(ratio, verdict):
    assert judge_direction(ratio) == verdict


GRID = {  # test loss of three seeds per setting, like chapter 9's grids
    "a": [0.125, 0.130, 0.120],
    "b": [0.128, 0.131, 0.126],  # within twice the standard error of the difference: tied
    "c": [0.149, 0.150, 0.148],  # 19% behind, beyond the spread
    "d": [0.30, 0.31, 0.29],  # more than twice the best
    "e": [None, 2.7, 2.9],  # a seed diverged
}


def test_best_setting_and_ties():
    best, tied = best_setting(GRID)
    assert best == "a" and sorted(tied) == ["a", "b"]
    assert grid_summary(GRID)["e"][0] == float("inf")


@pytest.mark.parametrize(
    ("claimed", "verdict"),
    [(["a"], HOLDS), (["b", "d"], HOLDS), (["c"], LOOSE), (["c", "d"], LOOSE), (["d"], WRONG),
     (["e"], WRONG)],
)  # fmt: skip
def test_judge_choice(claimed, verdict):
    assert judge_choice(GRID, claimed) == verdict


def test_judge_choice_needs_settings_of_the_grid():
    with pytest.raises(ValueError, match="settings of the grid"):
        judge_choice(GRID, ["z"])
    with pytest.raises(ValueError, match="settings of the grid"):
        judge_choice(GRID, [])
    with pytest.raises(ValueError, match="non-empty"):
        judge_choice({"a": []}, ["a"])


def test_judge_statement():
    assert judge_statement(True) == HOLDS
    assert judge_statement(np.bool_(False)) == WRONG
    with pytest.raises(TypeError, match="bool"):
        judge_statement("True")  # a printed literal is not a computed statement
    with pytest.raises(TypeError, match="bool"):
        judge_statement(1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: judge("7", 7), "value must be a number"),
        (lambda: judge(float("nan"), 7), "finite"),
        (lambda: judge(1.0, (3, 2)), "low <= high"),
        (lambda: judge(1.0, -1), "positive"),
        (lambda: judge(1.0, 1, rel_tol=1.5), "rel_tol"),
        (lambda: judge(1.0, 1, loose_factor=0.5), "loose_factor"),
        (lambda: judge_sweep([], 1.0), "at least one"),
        (lambda: judge_bound(1.0), "neither"),
        (lambda: judge_bound(1.0, at_least=5, at_most=2), "exceed"),
        (lambda: judge_bound(1.0, at_most=-2), "positive"),
        (lambda: judge_direction(0.0), "positive"),
        (lambda: judge_direction(1.2, margin=1.5), "margin"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


# ----------------------------------------------------------------------------- the table


def test_table_records_named_sources_and_checks_verdicts():
    table = ClaimTable()
    verdict = table.add("x", "about 4", computed="4.2", verdict=judge(4.2, 4), source=judge,
                        claimed=4, values=4.2)  # fmt: skip
    assert verdict == HOLDS and len(table) == 1
    assert table.claims[0].source == "lora_lab.claims.judge"
    assert table.claims[0].values == (4.2,)
    table.add("y", "fits", computed="n/a", verdict=NOT_MEASURED, source="this page, section 2")
    assert table.counts() == {HOLDS: 1, LOOSE: 0, WRONG: 0, NOT_MEASURED: 1}
    assert list(table.frame()["verdict"]) == [HOLDS, NOT_MEASURED]
    with pytest.raises(ValueError, match="verdict must be one of"):
        table.add("z", "", computed="", verdict="true", source=judge)
    with pytest.raises(TypeError, match="source must be"):
        table.add("z", "", computed="", verdict=HOLDS, source=None)
    with pytest.raises(ValueError, match="claimed"):
        table.add("z", "", computed="", verdict=HOLDS, source=judge, claimed=(None, None))


def test_source_name_of_a_bound_method():
    from lora_lab.specs import PRESETS

    assert (
        source_name(PRESETS["gpt2"].lora_parameters) == "lora_lab.specs.ModelSpec.lora_parameters"
    )


def test_plot_draws_one_row_per_numeric_claim():
    import matplotlib

    matplotlib.use("Agg")
    table = ClaimTable()
    table.add("a", "4", computed="", verdict=LOOSE, source=judge, claimed=4, values=7.3)
    table.add("b", "0.1-1%", computed="", verdict=LOOSE, source=judge, claimed=(0.1, 1.0),
              values=[0.062, 0.5], point_verdicts=[LOOSE, HOLDS])  # fmt: skip
    with pytest.raises(ValueError, match="one verdict per value"):
        table.add(
            "b", "", computed="", verdict=LOOSE, source=judge, values=[1, 2], point_verdicts=[LOOSE]
        )
    table.add("c", "80+", computed="", verdict=HOLDS, source=judge, claimed=(80, None), values=111)
    table.add("d", "true", computed="", verdict=HOLDS, source=judge)  # no numbers: not drawn
    table.add(
        "e", "within 2", computed="", verdict=HOLDS, source=judge, claimed=(None, 2), values=-1.5
    )
    ax = table.plot()
    assert len(ax.get_yticks()) == 3
    assert ax.get_xscale() == "log"


# ----------------------------------------------------------------------------- the page


def _page_code():
    cells = json.loads(PAGE.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # drop IPython's '!' and '%' lines, which are not Python
    return [
        "\n".join(line for line in s.splitlines() if not line.lstrip().startswith(("!", "%")))
        for s in sources
    ]


def _called_names(tree):
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(
                f.id
                if isinstance(f, ast.Name)
                else f.attr
                if isinstance(f, ast.Attribute)
                else None
            )
    return names


def _sources_of_claims(tree):
    """The source= argument of every claims.add(...) call."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add"
        ):
            for kw in node.keywords:
                if kw.arg == "source":
                    found.append(kw.value)
    return found


def _string_names(tree):
    """{name: text} of every name the page binds to a string literal (``A, B = x, "text"`` too)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = (
                zip(target.elts, value.elts, strict=False)
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                else [(target, value)]
            )
            for t, v in pairs:
                if (
                    isinstance(t, ast.Name)
                    and isinstance(v, ast.Constant)
                    and isinstance(v.value, str)
                ):
                    out[t.id] = v.value
    return out


def test_every_claim_names_a_source_that_exists_and_is_called():
    """A function named as a source is called in the cell that records the claim."""
    trees = [ast.parse(code) for code in _page_code()]
    strings = {k: v for t in trees for k, v in _string_names(t).items()}
    sources = [(s, _called_names(t)) for t in trees for s in _sources_of_claims(t)]
    assert len(sources) >= 20, "the page judges every quantitative claim of the lesson"
    for node, called in sources:
        if isinstance(node, ast.Name) and node.id in strings:
            node = ast.Constant(strings[node.id])
        if isinstance(node, ast.Constant):  # a cell: it must name a section of the page
            assert isinstance(node.value, str) and node.value.startswith("this page"), node.value
            continue
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
        assert name, ast.dump(node)
        assert name in called, f"the page names {name} as a source but its cell never calls it"


def test_committed_sources_resolve_to_lora_lab_functions():
    cells = json.loads(PAGE.read_text(encoding="utf-8"))["cells"]
    tagged = [c for c in cells if "claims-table" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "one cell, tagged claims-table, shows the whole table"
    text = "".join("".join(o.get("data", {}).get("text/html", "")) for o in tagged[0]["outputs"])
    assert text.count("<tr>") - 1 >= MIN_CLAIMS, "the committed table lists every claim"
    names = sorted(set(_lora_lab_names(text)))
    assert names, "the committed table names lora_lab functions"
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        obj = None
        while module:
            try:
                obj = importlib.import_module(module)
                break
            except ImportError:
                module, _, outer = module.rpartition(".")
                attr = f"{outer}.{attr}"
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), dotted


def _lora_lab_names(text):
    import re

    return re.findall(r"\blora_lab(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)


def stats(mean, sd, n=3):
    return {"mean": mean, "sd": sd, "n": n, "min": mean - sd, "max": mean + sd}


@pytest.mark.parametrize(
    "a,b,verdict",
    [
        (stats(40.0, 2.0), stats(20.0, 2.0), "holds"),  # far apart, beyond the noise
        (stats(24.0, 14.0), stats(20.0, 6.0), "loose"),  # 20% higher, but within 2 se
        (stats(20.0, 2.0), stats(40.0, 2.0), "wrong"),  # the other way, beyond the noise
        (stats(21.0, 0.1), stats(20.0, 0.1), "loose"),  # beyond the noise, inside the margin
        (stats(5.0, 0.1), stats(0.0, 0.0), "holds"),  # B scored nothing
    ],
)
def test_judge_better(a, b, verdict):
    assert judge_better(a, b) == verdict


def test_judge_better_refuses_what_is_not_seed_stats():
    with pytest.raises(ValueError, match="a must be seed_stats"):
        judge_better(0.5, stats(1.0, 0.1))
