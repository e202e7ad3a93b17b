"""Chapter 10's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here, or measured (the chance level of subspace
overlap), not taken from the checkers' own formulas.
"""

import math

import pytest
import torch
import torch.nn as nn

from lora_lab.checks import ch10 as check
from lora_lab.lora import LoRALinear


def test_chance_overlap():
    assert check.chance_overlap(64 / 11008).correct  # Llama-2-7B down_proj reads 11008 features
    assert check.chance_overlap(64 / 4096, module="q_proj").correct
    assert check.chance_overlap(8 / 4096, module="q_proj", i=8, j=2).correct
    assert not check.chance_overlap(0.01).correct
    assert not check.chance_overlap("0.0058").correct
    result = check.chance_overlap(None)
    assert not result.correct and "No answer yet" in result.message


@pytest.mark.parametrize(
    "answer, says",
    [
        (8 * 64 / 11008, "divides it by min"),
        (8 / 11008, "larger one stays"),
        (64 / 4096, "input space"),
    ],
)
def test_chance_overlap_names_the_slip(answer, says):
    result = check.chance_overlap(answer)
    assert not result.correct and says in result.message


def test_chance_overlap_rejects_unknown_model_and_module():
    with pytest.raises(ValueError, match="model must be one of"):
        check.chance_overlap(0.1, model="gpt-5")
    with pytest.raises(ValueError, match="module must be one of"):
        check.chance_overlap(0.1, module="lm_head")


def test_chance_level_is_what_random_subspaces_show():
    """max(i, j)/d agrees with 2000 random pairs of subspaces (d=64, i=4, j=16) to 0.005.

    The standard error of the mean is about 0.0008 here, so 0.005 is over 6 of them.
    """
    gen = torch.Generator().manual_seed(0)
    d, i, j, n = 64, 4, 16, 2000
    U = torch.linalg.qr(torch.randn(n, d, i, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, d, j, generator=gen, dtype=torch.float64))[0]
    phi = (U.transpose(1, 2) @ V).square().sum((1, 2)) / min(i, j)
    assert abs(phi.mean().item() - 0.25) < 0.005
    assert check.chance_overlap(16 / 4096, module="q_proj", i=4, j=16).correct


def test_init_bound():
    assert check.init_bound(1 / math.sqrt(352)).correct  # the shipped GPT's MLP width
    assert check.init_bound(0.0533002).correct  # 1/sqrt(352) = 0.05330017...
    assert check.init_bound(0.125, in_features=64).correct
    assert not check.init_bound(0.06).correct
    assert not check.init_bound(None).correct
    assert not check.init_bound([0.05]).correct


@pytest.mark.parametrize(
    "answer, says",
    [
        (1 / math.sqrt(128), "n_embd"),
        (math.sqrt(6 / 352), "He's bound"),
        (1 / math.sqrt(3 * 352), "standard deviation"),
    ],
)
def test_init_bound_names_the_slip(answer, says):
    result = check.init_bound(answer)
    assert not result.correct and says in result.message


def test_init_bound_is_what_lora_a_draws():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(352, 128, bias=False), rank=64)
    biggest = layer.lora_A.weight.abs().max().item()
    assert biggest <= 1 / math.sqrt(352) < biggest * 1.001  # 22528 draws fill the box
    assert check.init_bound(biggest, in_features=352).correct


def test_init_bound_on_another_model():
    """Qwen2.5-0.5B's down_proj reads 4864 features; its hidden size is 896."""
    assert check.init_bound(1 / math.sqrt(4864), in_features=4864, hidden_size=896).correct
    result = check.init_bound(1 / math.sqrt(896), in_features=4864, hidden_size=896)
    assert not result.correct and "n_embd) = 896" in result.message
    result = check.init_bound(1 / math.sqrt(128), in_features=4864, hidden_size=896)
    assert not result.correct and "n_embd" not in result.message  # the shipped width: no named slip


def test_init_bound_rejects_bad_width():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        check.init_bound(0.1, in_features=0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        check.init_bound(0.1, hidden_size=64.0)


def spectrum_layer():
    """A rank-4 LoRALinear whose update has singular values 3, 2, 1 and 0.5 (scaling 1)."""
    layer = LoRALinear(nn.Linear(16, 12, bias=False), rank=4, alpha=4)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(4, 16))
        layer.lora_B.weight.zero_()
        layer.lora_B.weight[:4] = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    return layer


def test_spectrum_layer_is_as_stated():
    S = torch.linalg.svdvals(spectrum_layer().delta_weight())
    assert torch.allclose(S[:4], torch.tensor([3.0, 2.0, 1.0, 0.5]))
    assert S[4:].abs().max() == 0


def test_energy_rank():
    layer = spectrum_layer()  # energies 9, 4, 1, 0.25 of 14.25: 63%, 91%, 98%, 100%
    assert check.energy_rank(2, layer).correct
    assert check.energy_rank(1, layer, share=0.6).correct
    assert check.energy_rank(3, layer, share=0.95).correct
    assert check.energy_rank(4, layer, share=1.0).correct
    result = check.energy_rank(1, layer)
    assert not result.correct and "hold only" in result.message
    result = check.energy_rank(3, layer)
    assert not result.correct and "more than needed" in result.message
    result = check.energy_rank(4, layer)
    assert not result.correct and "upper bound" in result.message
    assert not check.energy_rank(0, layer).correct
    assert not check.energy_rank(2.0, layer).correct
    assert not check.energy_rank(None, layer).correct


def test_energy_rank_rejects_bad_input():
    with pytest.raises(TypeError, match="layer must be a lora_lab LoRALinear"):
        check.energy_rank(2, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="share must be"):
        check.energy_rank(2, spectrum_layer(), share=1.5)
    with pytest.raises(ValueError, match="update is zero"):
        check.energy_rank(2, LoRALinear(nn.Linear(8, 8), rank=2))


# Exercise 4 (code): the amplification factor of section 6


def right_amplification(W, delta, r):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T)


def test_amplification_factor_right_answer_passes():
    result = check.amplification_factor(right_amplification)
    assert result.correct and "all 5 cases" in result.message


def test_amplification_factor_unanswered():
    def todo(W, delta, r):
        raise NotImplementedError

    assert "No answer yet" in check.amplification_factor(todo).message
    assert "No answer yet" in check.amplification_factor(None).message


@pytest.mark.parametrize(
    "wrong, case",
    [
        # every singular direction of delta, not the top r: a rank-2 update at r = 1 differs
        (
            lambda W, delta, r: (
                delta.norm() / (lambda U, S, Vh: (U.T @ W @ Vh.T).norm())(*torch.linalg.svd(delta))
            ),
            "case 1 of 5",
        ),
        # the inverse ratio: 2.5 instead of 0.4 on the first case
        (lambda W, delta, r: 1 / right_amplification(W, delta, r), "case 1 of 5"),
        # W's own top directions instead of delta's: right only when they coincide (case 1)
        (lambda W, delta, r: right_amplification(W, W, r) * delta.norm() / W.norm(), "case 2 of 5"),
        # the right-singular vectors taken as columns of Vh instead of rows
        (
            lambda W, delta, r: (
                lambda U, S, Vh: delta.norm() / (U[:, :r].T @ W @ Vh[:, :r]).norm()
            )(*torch.linalg.svd(delta)),
            "case 3 of 5",
        ),
        # the left vectors on both sides: U^T W U
        (
            lambda W, delta, r: (
                lambda U, S, Vh: delta.norm() / (U[:, :r].T @ W @ U[:, :r]).norm()
            )(*torch.linalg.svd(delta)),
            "case 4 of 5",
        ),
    ],
)
def test_amplification_factor_typical_slips_fail_naming_the_case(wrong, case):
    result = check.amplification_factor(wrong)
    assert not result.correct and case in result.message, result.message
    assert "Expected" in result.message or "raised" in result.message


def test_amplification_factor_hand_values():
    """The hand-worked expectations: 2/5, 3/0.5, sqrt(10)/4, 2/0.5."""
    cases = check._amplification_cases()
    assert [round(e, 6) for _, _, e in cases[:4]] == [0.4, 6.0, round(math.sqrt(10) / 4, 6), 4.0]
