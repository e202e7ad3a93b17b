"""Chapter 3's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here (not with the checkers' own formulas) or measured
with lora_lab (one real optimizer step, lora_lab.LoRALinear), so a slip in either shows.
"""

import math

import pytest
import torch
import torch.nn as nn

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


@pytest.mark.parametrize(
    "rule, optimizer, right",
    [
        ("alpha/r", "adamw", 1.0),  # s r = alpha at every rank
        ("alpha/sqrt(r)", "adamw", 4.0),  # s r = alpha sqrt(r): sqrt(64 / 4)
        ("alpha/r", "sgd", 1 / 16),  # s^2 r = alpha^2 / r: 4 / 64
        ("alpha/sqrt(r)", "sgd", 1.0),  # s^2 r = alpha^2
    ],
)
def test_first_step_ratio(rule, optimizer, right):
    assert check.first_step_ratio(right, rule=rule, optimizer=optimizer).correct
    assert not check.first_step_ratio(right * 1.01, rule=rule, optimizer=optimizer).correct
    assert not check.first_step_ratio(None, rule=rule, optimizer=optimizer).correct


@pytest.mark.parametrize(
    "answer, says",
    [
        (0.25, "Frobenius norm"),  # the old fixed-distribution answer: s sqrt(r)
        (1 / 16, "other optimizer"),  # SGD's answer
        (4.0, "other scaling rule"),  # rsLoRA's answer
        (16.0, "ranks alone"),
    ],
)
def test_first_step_ratio_names_the_slip(answer, says):
    result = check.first_step_ratio(answer)
    assert not result.correct and says in result.message


def test_first_step_ratio_rejects_unknown_rule_and_optimizer():
    with pytest.raises(ValueError, match="rule must be one of"):
        check.first_step_ratio(1.0, rule="standard")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        check.first_step_ratio(1.0, optimizer="adam")


@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("sgd", 0.1)])
@pytest.mark.parametrize("rule", ["alpha/r", "alpha/sqrt(r)"])
def test_first_step_ratio_is_what_a_real_step_measures(rule, optimizer, lr):
    """The expected ratio agrees with one real optimizer step on a 256-wide layer (15%: the
    ratio is an expectation over A's random rows, and rank 4 has only four)."""
    from lora_lab.scaling import linear_task, update_size

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    target = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) / 256
    loss_fn = linear_task(layer, target, batch_size=64)
    along = {
        r: update_size(layer, loss_fn, rank=r, rule=rule, optimizer=optimizer, lr=lr).along_gradient
        for r in (4, 64)
    }
    measured = along[64] / along[4]
    expected = {"adamw": {"alpha/r": 1, "alpha/sqrt(r)": 4}, "sgd": {"alpha/r": 1 / 16,
                "alpha/sqrt(r)": 1}}[optimizer][rule]  # fmt: skip
    assert math.isclose(measured, expected, rel_tol=0.15)


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


# ----------------------------------------------------------------------------- the layer


def lora_forward(x, W, b, A, B, scaling):
    return x @ W.T + b + scaling * (x @ A.T) @ B.T


def merge(W, A, B, scaling):
    return W + scaling * B @ A


def unmerge(W_merged, A, B, scaling):
    return W_merged - scaling * B @ A


def test_lora_functions_pass_when_right():
    result = check.lora_functions(lora_forward, merge, unmerge)
    assert result.correct and "9 cases" in result.message


@pytest.mark.parametrize(
    "forward, merge_fn, unmerge_fn, says",
    [
        # no scaling: wrong from the first case (rank 1, scaling 2)
        (lambda x, W, b, A, B, scaling: x @ W.T + b + (x @ A.T) @ B.T, merge, unmerge,
         "lora_forward, case 1 of 3 (rank 1, square"),
        # the lesson's order, x @ A @ B: runs on the square rank-1 layer, not on 6 -> 10
        (lambda x, W, b, A, B, scaling: x @ W.T + b + scaling * (x @ A.T) @ B.T, merge,
         unmerge, None),
        (lora_forward, lambda W, A, B, scaling: W + scaling * A.T @ B.T, unmerge,
         "merge, case 1 of 3"),
        (lora_forward, merge, lambda W_merged, A, B, scaling: W_merged + scaling * B @ A,
         "unmerge, case 1 of 3 (rank 1, square, after merge"),
        (lambda x, W, b, A, B, scaling: x @ W.T + scaling * (x @ A.T) @ B.T, merge, unmerge,
         "values differ"),  # the bias forgotten
    ],
)  # fmt: skip
def test_lora_functions_name_the_first_wrong_case(forward, merge_fn, unmerge_fn, says):
    result = check.lora_functions(forward, merge_fn, unmerge_fn)
    if says is None:  # the right forward written another way passes
        assert result.correct
    else:
        assert not result.correct and says in result.message


def test_lora_functions_report_an_exception_as_a_case():
    def lesson_order(x, W, b, A, B, scaling):  # A and B in the lesson's (in, r), (r, out) layout
        return x @ W.T + b + scaling * (x @ A) @ B

    result = check.lora_functions(lesson_order, merge, unmerge)
    assert (
        not result.correct
        and "raised RuntimeError" in result.message
        and "case 1" in result.message
    )


def test_lora_functions_unanswered():
    def stub(*args, **kwargs):
        raise NotImplementedError

    assert "No answer yet" in check.lora_functions(stub, stub, stub).message


class Layer(nn.Module):
    """Chapter 3's ScratchLoRALinear, written again here."""

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, use_rslora=False):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    @torch.no_grad()
    def merge(self):
        self.base_layer.weight += self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base_layer.weight -= self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        self.merged = False


class NoRsLoRA(Layer):
    def __init__(self, base, rank=8, alpha=16, dropout=0.0, use_rslora=False):
        super().__init__(base, rank, alpha, dropout, use_rslora=False)


class DropoutOnBoth(Layer):
    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        x = self.lora_dropout(x)
        return self.base_layer(x) + self.scaling * self.lora_B(self.lora_A(x))


class MergeIgnored(Layer):
    def forward(self, x):  # adds the update again while merged
        return self.base_layer(x) + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))


class UnmergeForgotten(Layer):
    @torch.no_grad()
    def unmerge(self):
        self.merged = False


def test_layer_class_passes_the_chapters_layer_and_lora_labs():
    from lora_lab import LoRALinear

    assert check.layer_class(Layer).correct
    assert check.layer_class(LoRALinear).correct


@pytest.mark.parametrize(
    "cls, says",
    [
        (NoRsLoRA, "rsLoRA's scaling: scaling"),
        (DropoutOnBoth, "train output (same dropout mask)"),
        (MergeIgnored, "output while merged"),
        (UnmergeForgotten, "weight after unmerge()"),
    ],
)
def test_layer_class_names_what_differs(cls, says):
    result = check.layer_class(cls)
    assert not result.correct and says in result.message


def test_layer_class_wants_a_class():
    assert not check.layer_class(Layer(nn.Linear(4, 4), rank=2)).correct
