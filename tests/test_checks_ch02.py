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


def _svd(M):
    return torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n)


def test_best_rank_r_passes_the_svd_and_an_svd_free_construction():
    def truncated_svd(M, r):
        U, S, Vh = _svd(M)
        return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]

    def from_eigenvectors(M, r):  # no SVD: project the rows on the top-r eigenvectors of M^T M
        _, V = torch.linalg.eigh(M.T @ M)  # ascending eigenvalues
        V_r = V[:, V.shape[1] - r :]
        return M @ V_r @ V_r.T

    for fn in (truncated_svd, from_eigenvectors):
        result = check.best_rank_r(fn)
        assert result.correct and "all 7 cases" in result.message, result


def test_best_rank_r_names_the_first_wrong_case():
    def without_singular_values(M, r):
        U, _, Vh = _svd(M)
        return U[:, :r] @ Vh[:r]

    def smallest_values(M, r):  # torch sorts S from the largest
        U, S, Vh = _svd(M)
        return (U[:, -r:] * S[-r:]) @ Vh[-r:]

    def columns_of_vh(M, r):  # Vh's rows are the singular vectors, not its columns
        U, S, Vh = _svd(M)
        return (U[:, :r] * S[:r]) @ Vh[:, :r].T

    for fn in (without_singular_values, smallest_values, columns_of_vh):
        result = check.best_rank_r(fn)
        assert not result.correct, fn.__name__
        assert "case 1 of 7 (a random 5x4 matrix; M=tensor of shape (5, 4)" in result.message
        assert "values differ by up to" in result.message

    def refuses_rank_zero(M, r):
        if r < 1:
            raise ValueError("r must be positive")
        U, S, Vh = _svd(M)
        return (U[:, :r] * S[:r]) @ Vh[:r]

    result = check.best_rank_r(refuses_rank_zero)
    assert not result.correct and "case 6 of 7 (a random 4x4 matrix, r = 0" in result.message
    assert "raised ValueError: r must be positive" in result.message


def test_best_rank_r_cases_cover_rank_deficiency_and_r_above_the_rank():
    ranks = [
        (int(torch.linalg.matrix_rank(M)), r, min(M.shape)) for _, M, r in check._low_rank_cases()
    ]
    assert any(rank < full and r == rank for rank, r, full in ranks)  # rank-deficient, r at rank
    assert any(r > rank for rank, r, _ in ranks)  # r above the rank: M itself comes back
    assert any(r == 0 for _, r, _ in ranks) and any(r == full for _, r, full in ranks)


def test_best_rank_r_placeholder_is_unanswered():
    def todo(M, r):
        raise NotImplementedError

    assert check.best_rank_r(todo).message.startswith("No answer yet")
