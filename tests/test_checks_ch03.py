"""Chapter 3's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here (not with the checkers' own formulas), so a slip
in either shows.
"""

import math

import pytest
import torch

from lora_lab.checks import ch03 as check


def test_lesson_trainable():
    # A (1024, 16) + B (16, 4096) + the unfrozen bias (4096,)
    assert check.lesson_trainable(86_016).correct
    assert check.lesson_trainable(86_016.0).correct
    assert check.lesson_trainable(torch.tensor(86_016)).correct
    # other shapes: A (4096, 8) + B (8, 4096) + bias 4096, the lesson's own example
    assert check.lesson_trainable(69_632, in_features=4096, out_features=4096, rank=8).correct
    assert not check.lesson_trainable(86_017).correct


@pytest.mark.parametrize("answer, says", [(81_920, "bias"), (86_016 + 1024 * 4096, "freeze")])
def test_lesson_trainable_names_the_slip(answer, says):
    result = check.lesson_trainable(answer)
    assert not result.correct and says in result.message


def test_lesson_trainable_unanswered_and_bad_types():
    result = check.lesson_trainable(None)
    assert not result.correct and "No answer yet" in result.message
    assert not check.lesson_trainable("86016").correct
    assert not check.lesson_trainable(True).correct


def test_norm_ratio():
    assert check.norm_ratio(0.25).correct  # (1/64) sqrt(64) / ((1/4) sqrt(4))
    assert check.norm_ratio(1.0, rule="rslora").correct
    assert check.norm_ratio(0.5, r_from=1, r_to=4).correct
    assert not check.norm_ratio(0.3).correct
    assert not check.norm_ratio(0.25, rule="rslora").correct
    assert not check.norm_ratio(None).correct


@pytest.mark.parametrize("answer, says", [(4.0, "inverse"), (1 / 16, "scalings alone")])
def test_norm_ratio_names_the_slip(answer, says):
    result = check.norm_ratio(answer)
    assert not result.correct and says in result.message


def test_norm_ratio_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of"):
        check.norm_ratio(0.25, rule="alpha/r")


def test_exercise_layer_is_fixed_and_nonzero():
    a, b = check.exercise_layer(), check.exercise_layer()
    assert torch.equal(a.lora_B.weight, b.lora_B.weight) and a.lora_B.weight.abs().min() > 0
    assert a.scaling == 1.5  # alpha 3 / rank 2


def test_merged_weight():
    layer = check.exercise_layer()
    W, A, B = (
        p.detach() for p in (layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight)
    )
    by_hand = torch.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            by_hand[i, j] = W[i, j] + 1.5 * sum(B[i, k] * A[k, j] for k in range(2))
    assert check.merged_weight(by_hand).correct
    layer.merge()  # the package's merge gives the same weight
    assert check.merged_weight(layer.base_layer.weight.detach()).correct
    assert not check.merged_weight(by_hand + 1e-3).correct
    assert not check.merged_weight(by_hand.T).correct
    assert not check.merged_weight(None).correct


@pytest.mark.parametrize(
    "slip, says", [("no scaling", "without the scaling"), ("base", "base weight unchanged")]
)
def test_merged_weight_names_the_slip(slip, says):
    layer = check.exercise_layer()
    W, A, B = (
        p.detach() for p in (layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight)
    )
    answer = W + B @ A if slip == "no scaling" else W.clone()
    result = check.merged_weight(answer)
    assert not result.correct and says in result.message


def test_norm_ratio_is_what_random_factors_show():
    """The expected ratio agrees with a measurement on large random factors (2% tolerance)."""
    gen = torch.Generator().manual_seed(0)
    d = 512

    def size(r):
        A = torch.randn(r, d, generator=gen) / math.sqrt(d)
        B = torch.randn(d, r, generator=gen)
        return torch.linalg.matrix_norm(B @ A).item() / r

    assert math.isclose(size(64) / size(4), 0.25, rel_tol=0.02)
