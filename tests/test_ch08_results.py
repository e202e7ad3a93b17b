"""lora_lab/results/ch08_compare.json: made by the current plan, and what chapter 8's verdicts rest on.

Chapter 8 and the claims page read the committed file. These tests check that it is the full
run of the plan the code makes today, that the runs it judges learnt, that its learning rates
are bracketed and its timings consistent with the FLOP bound, that a fresh run repeats one of
its runs, and that the script that writes it still runs.
"""

import json

import pytest

from lora_lab import load_pretrained
from lora_lab.experiments import (
    COMPARE_FILE,
    METHODS,
    chosen_lrs,
    committed_run,
    compare_plan,
    final_scores,
    finetune,
    lesson_verdicts,
    rank_results,
    read_compare,
    reproduces,
    speed_summary,
)


@pytest.fixture(scope="module")
def results():
    results = read_compare()
    assert results is not None, f"{COMPARE_FILE} is missing: run python scripts/ch08_compare.py"
    return results


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(device="cpu")


def test_the_file_is_the_full_run_of_todays_plan(results, shipped):
    assert not results["meta"]["quick"] and results["meta"]["threads"] == 1
    plan = json.loads(json.dumps(compare_plan(shipped)))  # as JSON stores it
    assert results["plan"] == plan
    assert len(plan["seeds"]) >= 3
    assert results["model_params"] == sum(p.numel() for p in shipped.parameters())
    assert not any(r["diverged"] for r in results["runs"] if r["part"] == "grid" and
                   r["lr"] == chosen_lrs(results)[r["task"], r["method"]][0])  # fmt: skip


def test_every_chosen_learning_rate_is_bracketed(results):
    chosen = chosen_lrs(results)
    assert set(chosen) == {(t, m) for t in results["plan"]["tasks"] for m in METHODS}
    assert all(bracketed for _, bracketed in chosen.values()), chosen


def test_the_runs_the_verdicts_rest_on_learnt(results):
    scores = final_scores(results)
    roles = {spec["role"]: task for task, spec in results["plan"]["tasks"].items()}
    assert scores[roles["far"], "full"]["min"] >= 80  # every seed of full fine-tuning
    assert all(scores[roles["close"], m]["min"] >= 80 for m in METHODS)  # every method
    lora_best = max(scores[roles["far"], m]["max"] for m in METHODS[1:])
    assert lora_best < scores[roles["far"], "full"]["min"]  # the gap the verdicts judge is real
    for (_, _), (_, _, stats) in rank_results(results).items():
        assert stats["n"] == len(results["plan"]["seeds"])


def test_timings_are_consistent_with_the_flop_bound(results):
    speed = speed_summary(results["speed"]["seconds"], results["speed"]["flop_bound"])
    assert set(speed) == set(METHODS) - {"full"}
    assert all(s["consistent"] and s["bound"] < s["ratio"] for s in speed.values()), speed


def test_lesson_verdicts_judge_every_row(results):
    rows = lesson_verdicts(results)
    assert [r["row"] for r in rows] == [
        "Memory (weights, grads, optimizer)",
        "Memory (whole training run)",
        "Training speed",
        "Final performance (butler)",
        "Final performance (reverse3)",
        "Task similarity",
        "Adapter swapping",
    ]
    assert all(r["verdict"] in ("holds", "loose", "wrong") for r in rows), rows


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_a_fresh_run_repeats_a_committed_one(results, shipped):
    committed = committed_run(results, "butler", "full", seed=0)
    plan = results["plan"]
    fresh = finetune(shipped, "butler", committed["steps"], committed["lr"],
                     batch_size=plan["batch_size"], seed=0)  # fmt: skip
    agrees, why = reproduces(fresh, committed)
    assert agrees, why


@pytest.mark.slow
def test_the_script_runs_quick(tmp_path):
    from scripts.ch08_compare import main

    out = tmp_path / "quick.json"
    main(["--quick", "--out", str(out)])
    quick = read_compare(out)
    assert quick["meta"]["quick"] and quick["plan"]["seeds"] == [0]
    assert {r["part"] for r in quick["runs"]} == {"grid", "rank"}
    assert len(lesson_verdicts(quick)) == 7
    with pytest.raises(SystemExit):
        main(["--quick"])  # the committed file is never overwritten by a toy run
