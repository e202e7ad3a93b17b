"""Chapter 8's exercise checkers: right answers pass, named slips and wrong answers fail.

The right answers are worked out independently of the checkers' formulas: bytes measured on
the tensors of a real training step, a gap computed from per-seed scores, the reference
choose_lr run on the same grids.
"""

import copy
import statistics

import pytest

from lora_lab import apply_lora, count_parameters, load_pretrained, train
from lora_lab.checks import ch08 as check
from lora_lab.experiments import choose_lr

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(device="cpu")


def state_bytes(base, lora):
    """Bytes of weights, gradients and AdamW state after one real training step."""
    model = copy.deepcopy(base)
    if lora is None:
        model.requires_grad_(True)
    else:
        apply_lora(model, **lora)
    history = train(model, "butler", 1, 1e-3, 2, progress=False)
    return history.memory["total"], model


def test_lora_state_bytes_accepts_the_measured_bytes(shipped):
    measured, _ = state_bytes(shipped, {"rank": 16, "target_modules": ["q_proj", "v_proj"]})
    assert check.lora_state_bytes(measured).correct  # AdamW's step counters: within tolerance
    assert check.lora_state_bytes(measured * 1.01).correct is False
    assert not check.lora_state_bytes(None).correct
    assert not check.lora_state_bytes(str(measured)).correct
    at_32, _ = state_bytes(shipped, {"rank": 32, "target_modules": ["q_proj", "v_proj"]})
    assert check.lora_state_bytes(at_32, rank=32).correct
    assert not check.lora_state_bytes(at_32).correct  # rank 32's bytes for rank 16's question


def test_lora_state_bytes_names_the_slips(shipped):
    model = apply_lora(copy.deepcopy(shipped), rank=16, target_modules=["q_proj", "v_proj"])
    n_lora, n_all = count_parameters(model)
    everything = check.lora_state_bytes(16 * n_all)  # every weight trained
    assert not everything.correct and "frozen" in everything.message
    adapter_only = check.lora_state_bytes(16 * n_lora)
    assert not adapter_only.correct and "adapter's" in adapter_only.message


def test_score_resolution_counts_answers_over_seeds():
    from lora_lab import get_task
    from lora_lab.experiments import seed_stats

    # two methods whose seeds differ by a single answer to a single question: the least gap
    n = len(get_task("butler").test)
    full = seed_stats([100 * k / n for k in (20, 25, 30)])
    lora = seed_stats([100 * k / n for k in (20, 25, 29)])
    right = full["mean"] - lora["mean"]
    assert check.score_resolution(right).correct
    assert not check.score_resolution(None).correct
    one_run = check.score_resolution(100 / n)
    assert not one_run.correct and "single run" in one_run.message
    fraction = check.score_resolution(right / 100)
    assert not fraction.correct and "points" in fraction.message
    assert not check.score_resolution(2 * right).correct
    assert check.score_resolution(100 / len(get_task("reverse3").test) / 5, "reverse3", 5).correct


def test_break_even_rank_accepts_the_rank_solved_from_measured_bytes(shipped):
    # bytes grow linearly with the rank: two ranks give the line, full fine-tuning the target
    full, _ = state_bytes(shipped, None)
    at_1, _ = state_bytes(shipped, {"rank": 1, "target_modules": ATTENTION})
    at_2, _ = state_bytes(shipped, {"rank": 2, "target_modules": ATTENTION})
    right = 1 + (full - at_1) / (at_2 - at_1)
    result = check.break_even_rank(right)
    assert result.correct and "128" in result.message  # above the largest rank allowed
    assert check.break_even_rank(round(right, 1)).correct
    assert not check.break_even_rank(128).correct
    assert not check.break_even_rank(None).correct
    # the slip: forgetting that LoRA keeps the frozen weights too (16 r per_rank = 16 N)
    model = apply_lora(copy.deepcopy(shipped), rank=1, target_modules=ATTENTION)
    per_rank, n_all = count_parameters(model)
    slip = check.break_even_rank((n_all - per_rank) / per_rank)
    assert not slip.correct and "frozen" in slip.message


# ---------------------------------------------------------------- exercise 4: choose_lr


def mean_of(seeds):
    return float("inf") if None in seeds else statistics.fmean(seeds)


def test_choose_lr_accepts_a_right_answer_written_another_way():
    def mine(losses):
        rates = sorted(losses)
        best = min(rates, key=lambda lr: mean_of(losses[lr]))
        return best, rates[0] != best != rates[-1]

    assert check.choose_lr(mine).correct
    assert check.choose_lr(choose_lr).correct


@pytest.mark.parametrize(
    "wrong, case",
    [
        (  # the single best seed instead of the mean
            lambda losses: (
                best := min(losses, key=lambda lr: min(s for s in losses[lr] if s is not None)),
                min(losses) < best < max(losses),
            ),
            "a lucky seed",
        ),
        (  # the edges taken from the dict's order, not the rates' values
            lambda losses: (
                best := min(losses, key=lambda lr: mean_of(losses[lr])),
                best not in (list(losses)[0], list(losses)[-1]),
            ),
            "rates not in order",
        ),
        (  # a diverged seed skipped instead of ruling its rate out
            lambda losses: (
                best := min(
                    losses, key=lambda lr: statistics.fmean(s for s in losses[lr] if s is not None)
                ),
                min(losses) < best < max(losses),
            ),
            "a diverged run",
        ),
        (lambda losses: min(losses, key=lambda lr: mean_of(losses[lr])), "three rates"),
    ],
)
def test_choose_lr_names_the_first_wrong_case(wrong, case):
    result = check.choose_lr(wrong)
    assert not result.correct and f"({case}" in result.message and "Expected" in result.message


def test_choose_lr_unanswered_and_raising():
    def stub(losses):
        raise NotImplementedError

    assert "No answer yet" in check.choose_lr(stub).message
    assert "No answer yet" in check.choose_lr(None).message

    def broken(losses):
        return sorted(losses.values())[0][0] + None

    result = check.choose_lr(broken)
    assert not result.correct and "raised TypeError" in result.message
