"""Checkers for chapter 2, "Low-rank intuition"."""

import torch

from lora_lab.checks import Result, check_function, check_number, unanswered
from lora_lab.lowrank import energy_captured, low_rank_approx, sample_image


def lora_params(answer, d_out=11008, d_in=4096, r=16):
    """Exercise 1: numbers LoRA of rank ``r`` trains for a ``d_out x d_in`` weight."""
    return check_number(
        answer,
        r * (d_in + d_out),
        what=f"LoRA parameters for a {d_out}x{d_in} weight at rank {r}",
        why=f"B is {d_out}x{r} and A is {r}x{d_in}, so r*(d_in + d_out) numbers, "
        f"against {d_out * d_in:,} for the full matrix.",
        hint="count the entries of B (d_out x r) and of A (r x d_in); the matrix need not be square.",
    )


def exercise_matrix():
    """The 4x4 matrix of exercise 2: the numbers 0..15 in rows."""
    return torch.arange(16, dtype=torch.float64).reshape(4, 4)


def svd_facts(rank1_error, rank, rank2_error):
    """Exercise 2: the rank-1 error of ``exercise_matrix()``, its rank, and its rank-2 error.

    All three are judged; the verdict names the first that is wrong.
    """
    M = exercise_matrix()
    S = torch.linalg.svdvals(M)
    expected_rank = int(torch.linalg.matrix_rank(M))
    given = {"the rank-1 error": rank1_error, "the rank": rank, "the rank-2 error": rank2_error}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        return unanswered(
            f"answer {', '.join(missing)}: take torch.linalg.svdvals of the matrix; the error of "
            "the best rank-k approximation comes from the values after the k-th, and the rank "
            "counts the values that are not zero."
        )
    first = check_number(
        rank1_error,
        S[1:].square().sum().sqrt().item(),
        what="the rank-1 Frobenius error",
        why="Eckart-Young: the error is the root of the sum of the squared singular values left out.",
        hint="combine every singular value after the first: the root of the sum of their squares.",
    )
    if not first:
        return first
    if isinstance(rank, bool) or not isinstance(rank, int):
        return Result(False, f"the rank should be an int, got {type(rank).__name__} {rank!r}.")
    if rank != expected_rank:
        return Result(
            False,
            f"the rank is {expected_rank}, you have {rank}: rows 2 to 4 are row 1 plus multiples "
            "of (1, 1, 1, 1), so only two singular values are not zero.",
        )
    second = check_number(
        rank2_error,
        0.0,
        what="the rank-2 error",
        why="",
        hint=f"a rank-{expected_rank} matrix is its own best rank-{expected_rank} approximation.",
    )
    if not second:
        return second
    return Result(
        True,
        f"the rank-1 error is {rank1_error:.6g}, the rank is {expected_rank}, so the rank-2 "
        "approximation is exact (error 0): Eckart-Young from the singular values alone.",
    )


def rank_for_energy(answer, share=0.9):
    """Exercise 3: the smallest rank whose approximation of the photo keeps ``share`` of its energy."""
    if answer is None:
        return unanswered(
            "compute the singular values of sample_image() and find where the "
            "running share of sum(S**2) first reaches the target."
        )
    S = torch.linalg.svdvals(sample_image().double())
    expected = next(r for r in range(1, S.numel() + 1) if energy_captured(S, r) >= share)
    if isinstance(answer, bool) or not isinstance(answer, int):
        return Result(False, f"the rank should be an int, got {type(answer).__name__} {answer!r}.")
    if answer == expected:
        return Result(
            True,
            f"rank {expected} is the first to keep {share:.0%} of the energy, "
            f"out of {S.numel()} possible.",
        )
    side = "keeps less than" if answer < expected else "is not the smallest to reach"
    return Result(False, f"rank {answer} {side} {share:.0%} of the energy.")


# ----------------------------------------------------------------------------- code exercise


def _low_rank_cases():
    """(label, M, r) for the code exercise: shapes, ranks and edge cases a learner can miss."""
    g = torch.Generator().manual_seed(2)
    lesson = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)  # rank 2
    u, v = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(5, generator=g).double()
    return [
        ("a random 5x4 matrix", torch.randn(5, 4, generator=g, dtype=torch.float64), 2),
        ("a random 3x6 matrix (wider than tall)", torch.randn(3, 6, generator=g).double(), 1),
        ("the lesson's rank-2 matrix, r = 1", lesson, 1),
        ("the lesson's rank-2 matrix, r = its rank", lesson, 2),
        ("a rank-1 outer product, r = 3, above its rank", torch.outer(u, v), 3),
        ("a random 4x4 matrix, r = 0 (keep nothing)", torch.randn(4, 4, generator=g).double(), 0),
        (
            "a random 6x6 matrix, r = 6 (keep everything)",
            torch.randn(6, 6, generator=g).double(),
            6,
        ),
    ]


def best_rank_r(fn):
    """Code exercise: ``fn(M, r)`` returns the best rank-``r`` approximation of ``M``.

    Judged against ``lora_lab.low_rank_approx`` on random, non-square and rank-deficient
    matrices, with ``r`` below, at and above the rank, 0 and full.
    """
    cases = [(label, {"M": M, "r": r}, low_rank_approx(M, r)) for label, M, r in _low_rank_cases()]
    return check_function(
        fn,
        cases,
        what="your best_rank_r",
        why="keep the r largest singular values, each with its left and right singular "
        "vectors (torch.linalg.svd sorts them from the largest; mind which of Vh's axes holds "
        "a vector). At or above the rank, M comes back unchanged.",
        atol=1e-6,
    )
