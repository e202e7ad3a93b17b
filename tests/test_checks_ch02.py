"""Chapter 2's checkers: right answers pass, each typical slip gets its own message."""

import math

import torch

from lora_lab.checks import ch02 as check
from lora_lab.lowrank import energy_captured, sample_image


def test_lora_params():
    assert check.lora_params(16 * (4096 + 11008))
    assert not check.lora_params(16 * 2 * 4096)  # as if the matrix were square
    assert not check.lora_params(11008 * 4096)  # the full matrix, not the update
    assert "No answer yet" in check.lora_params(None).message


def test_svd_facts_judges_all_three_answers():
    S = torch.linalg.svdvals(check.exercise_matrix())
    error = math.sqrt(sum(s**2 for s in S[1:].tolist()))
    assert check.svd_facts(error, 2, 0.0)
    wrong_error = check.svd_facts(S[0].item(), 2, 0.0)
    assert not wrong_error and "rank-1 Frobenius error" in wrong_error.message
    wrong_rank = check.svd_facts(error, 4, 0.0)
    assert not wrong_rank and "the rank is 2, you have 4" in wrong_rank.message
    wrong_rank2 = check.svd_facts(error, 2, 1.0)
    assert not wrong_rank2 and "its own best rank-2 approximation" in wrong_rank2.message
    assert not check.svd_facts(error, 2.0, 0.0)  # a rank is an int
    missing = check.svd_facts(error, None, None)
    assert not missing and "the rank, the rank-2 error" in missing.message


def test_rank_for_energy():
    S = torch.linalg.svdvals(sample_image().double())
    expected = next(r for r in range(1, S.numel() + 1) if energy_captured(S, r) >= 0.9)
    assert check.rank_for_energy(expected)
    assert "keeps less than" in check.rank_for_energy(expected - 1).message
    assert "not the smallest" in check.rank_for_energy(expected + 1).message
    assert "should be an int" in check.rank_for_energy(float(expected)).message
