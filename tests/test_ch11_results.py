"""lora_lab/results/ch11_variants.json: the full run of today's plan, and what chapter 11 rests on.

Chapter 11 reads the committed file. These tests check that it is the full run of the plan the
code makes today, that every method's chosen learning rate is bracketed and its runs learnt,
that its plain-LoRA runs are chapter 8's committed runs, and that a fresh run repeats one.
"""

import json

import pytest

from lora_lab import load_pretrained
from lora_lab.beyond import (
    LORAPLUS_RATIO,
    VARIANTS_FILE,
    chapter8_pairs,
    committed_run,
    loraplus_sweep,
    method_scores,
    read_variants,
    variants_plan,
)
from lora_lab.experiments import finetune, read_compare


@pytest.fixture(scope="module")
def results():
    results = read_variants()
    assert results is not None, f"{VARIANTS_FILE} is missing: run python scripts/ch11_variants.py"
    return results


def test_the_file_is_the_full_run_of_todays_plan(results):
    shipped = load_pretrained(device="cpu")
    assert not results["meta"]["quick"] and results["meta"]["threads"] == 1
    assert results["plan"] == json.loads(json.dumps(variants_plan(shipped)))
    assert len(results["plan"]["seeds"]) >= 3
    assert results["model_params"] == sum(p.numel() for p in shipped.parameters())


def test_every_method_chose_a_bracketed_rate_and_learnt(results):
    scores = method_scores(results)
    for method, score in scores.items():
        assert score["bracketed"], (method, score["lr"])
        # learnt: every seed at the chosen rate ends far below the loss it started from
        for curve in score["curves"]:
            assert curve[-1] < 0.5 * curve[0], method
        assert score["exact"]["mean"] > 5, method  # well above the pretrained model's 0%
    sweep = loraplus_sweep(results)
    assert {1, LORAPLUS_RATIO} <= set(sweep)


def test_plain_lora_is_chapter_8s_all_linear_lora_run_for_run(results):
    pairs = chapter8_pairs(results, read_compare())
    assert len(pairs) >= 9  # three shared rates, three seeds
    for ours, theirs in pairs:
        assert ours["train_loss"] == theirs["train_loss"] and ours["test"] == theirs["test"]


@pytest.mark.slow
def test_a_fresh_run_repeats_a_committed_one(results):
    scores = method_scores(results)
    lr = scores["DoRA"]["lr"]
    committed = committed_run(results, "DoRA", lr, seed=0)
    plan = results["plan"]
    run = finetune(load_pretrained(device="cpu"), plan["task"], plan["steps"], lr,
                   lora=plan["methods"]["DoRA"], batch_size=plan["batch_size"], seed=0)  # fmt: skip
    # bit for bit on the machine that wrote the file; float rounding may differ elsewhere
    assert abs(run.final_train_loss() - committed["train_loss"]) <= 0.1 * committed["train_loss"]
