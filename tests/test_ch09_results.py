"""scripts/ch09_grid.py runs (at a toy size), and lora_lab/results/ch09_grid.json, which chapter 9 loads,
holds every run the chapter reads, from the settings the script plans today."""

import json
import math
from pathlib import Path

import pytest

from lora_lab import load_model, train_settings
from lora_lab.specs import ModelSpec
from scripts import ch09_grid

COMMITTED = Path(__file__).resolve().parents[1] / "lora_lab" / "results" / "ch09_grid.json"
KNOBS = ("rank", "alpha", "targets", "use_rslora", "dropout", "lr")
RUN_FIELDS = {"seed", "diverged", "train_loss", "test_loss"} | set(KNOBS)
DONE_FIELDS = {"trainable", "loss_curve", "test_char_acc", "test_exact"}


def settings_read_by_the_chapter(grid):
    """Every setting (the reference with some knobs changed) chapter 9 looks up."""
    g = grid["grids"]
    wanted = [{}]
    wanted += [
        {"rank": r, "alpha": a} for r in g["rank_alpha"]["rank"] for a in g["rank_alpha"]["alpha"]
    ]
    wanted += [{"lr": x} for x in g["lr"]]
    wanted += [{"targets": label, "rank": r} for label, r in g["targets"].items()]
    wanted += [{"dropout": p} for p in g["dropout"]]
    wanted += [{"rank": r, "use_rslora": rs} for r in g["rules"]["rank"] for rs in (False, True)]
    wanted += [{"rank": e["rank"], "use_rslora": e["use_rslora"], "lr": x}
               for e in g["rules_lr"]["rates"] for x in e["lr"]]  # fmt: skip
    assert {(e["rank"], e["use_rslora"]) for e in g["rules_lr"]["rates"]} == {
        (r, rs) for r in g["rules_lr"]["rank"] for rs in (False, True)}  # fmt: skip
    return [{**grid["reference"], **w} for w in wanted]


def runs_of(grid, setting):
    return [r for r in grid["runs"] if all(
        math.isclose(r[k], setting[k]) if k == "lr" else r[k] == setting[k] for k in KNOBS)]  # fmt: skip


def check_shape(grid):
    assert {"task", "steps", "batch_size", "seeds", "lr", "budget", "reference", "targets",
            "grids", "runs", "model", "quick", "environment"} <= set(grid)  # fmt: skip
    for run in grid["runs"]:
        assert RUN_FIELDS <= set(run), run
        if not run["diverged"]:
            assert DONE_FIELDS <= set(run) and len(run["loss_curve"]) == grid["steps"]
            assert math.isfinite(run["test_loss"]) and 0 <= run["test_exact"] <= 1
    for setting in settings_read_by_the_chapter(grid):
        found = runs_of(grid, setting)
        assert sorted(r["seed"] for r in found) == grid["seeds"], setting


@pytest.mark.slow
def test_the_script_runs_at_a_toy_size(tmp_path):
    out = tmp_path / "grid.json"
    ch09_grid.main(["--quick", "--out", str(out)])
    grid = json.loads(out.read_text())
    assert grid["quick"] is True and grid["steps"] == 2 and grid["seeds"] == [0]
    check_shape(grid)


@pytest.fixture(scope="module")
def committed():
    return json.loads(COMMITTED.read_text())


def test_the_committed_grid_has_what_the_chapter_reads(committed):
    check_shape(committed)
    assert committed["quick"] is False and committed["model"] == "lora-lab/tiny-gpt"
    assert len(committed["seeds"]) >= 3


def test_the_committed_grid_is_what_the_script_plans(committed):
    base, _ = load_model(None)
    plan = ch09_grid.plan(base)
    for key in ("task", "steps", "batch_size", "seeds", "lr", "budget", "reference", "targets"):
        assert committed[key] == plan[key], key
    grids = plan["grids"]
    assert committed["grids"]["rank_alpha"] == grids["rank_alpha"]
    assert set(grids["lr"]) <= set(committed["grids"]["lr"])  # the script may widen it
    settings = train_settings(base)
    assert (committed["steps"], committed["batch_size"], committed["lr"]) == (
        settings.steps, settings.batch_size, settings.lr_lora)  # fmt: skip


def bracketed(grid, lrs, **change):
    mean = {}
    for lr in lrs:
        losses = [r["train_loss"] for r in runs_of(grid, {**grid["reference"], **change, "lr": lr})]
        mean[lr] = math.inf if None in losses else sum(losses) / len(losses)
    best = min(lrs, key=mean.get)
    return lrs[0] < best < lrs[-1]  # a worse rate on each side


def test_the_committed_reference_learned_and_its_rates_are_bracketed(committed):
    ref = runs_of(committed, committed["reference"])
    assert all(r["test_exact"] >= 0.85 for r in ref)  # a task the reference learns
    assert bracketed(committed, committed["grids"]["lr"])
    for e in committed["grids"]["rules_lr"]["rates"]:
        assert bracketed(committed, e["lr"], rank=e["rank"], use_rslora=e["use_rslora"]), e


def test_the_committed_counts_are_the_models(committed):
    base, _ = load_model(None)
    spec = ModelSpec.from_model(base)
    for label, rank in committed["grids"]["targets"].items():
        setting = {**committed["reference"], "targets": label, "rank": rank}
        counted = spec.lora_parameters(rank, committed["targets"][label])
        assert all(r["trainable"] == counted for r in runs_of(committed, setting)), label
