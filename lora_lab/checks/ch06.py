"""Checkers for chapter 6, "QLoRA"."""

import math
import numbers

import torch

from lora_lab.checks import Result, check_function, check_number, check_tensor

DQ_BLOCK = 256  # double quantization: one float32 scale per 256 8-bit block constants


def _is_number(answer):
    return isinstance(answer, numbers.Real) and not isinstance(answer, bool)


def dq_bits(answer, blocksize=128):
    """Exercise 1: bits per weight of NF4 with double quantization, for a very large matrix."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    expected = 4 + 8 / blocksize + 32 / (blocksize * DQ_BLOCK)
    slips = [  # (value, why), the first match wins
        (4 + 32 / blocksize, "that keeps the block constants in float32: no double quantization."),
        (4 + 8 / blocksize, "that leaves out the float32 scale each group of 256 constants keeps."),
        (
            4 + 8 / 64 + 32 / (64 * DQ_BLOCK),
            f"that is the figure for blocks of 64, not {blocksize}.",
        ),
        (
            4 + 8 / blocksize + 32 / DQ_BLOCK,
            "the 32-bit scale is shared by 256 constants, each of "
            f"which already covers {blocksize} weights.",
        ),
    ]
    if _is_number(answer):
        for value, why in slips:
            if not math.isclose(value, expected) and math.isclose(answer, value, rel_tol=1e-6):
                return Result(False, f"{answer:g} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"bits per weight, blocks of {blocksize}, double quantization",
        rel_tol=1e-6,
        why=f"4 bits of code, 8/{blocksize} for the block's 8-bit constant, and "
        f"32/({blocksize}*{DQ_BLOCK}) for the float32 scale of every {DQ_BLOCK} constants.",
        hint="add the code's 4 bits, the 8-bit constant shared by a block, and the 32-bit "
        "scale shared by 256 blocks, each divided by the weights that share it.",
    )


def exercise_blocks():
    """The blocks exercise 2's function is run on: [(label, block)], fixed (float32)."""
    gen = torch.Generator().manual_seed(6)
    normal = 0.02 * torch.randn(64, generator=gen)
    negative = 0.02 * torch.randn(64, generator=gen)
    negative[11] = -0.09  # the largest |weight| is a negative one
    outlier = 0.02 * torch.randn(64, generator=gen)
    outlier[40] = 1.0  # one weight about 50 times the others
    return [
        ("64 normal weights", normal),
        ("the largest |weight| is negative: it must get the code of -1", negative),
        ("an all-zero block: its absmax is 0, and every weight must get the code of the exact 0", torch.zeros(64)),
        ("one weight 50 times the others: the rest crowd the levels next to 0", outlier),
        ("a block of 16 weights", 0.02 * torch.randn(16, generator=gen)),
    ]  # fmt: skip


def nf4_quantize_block(fn):
    """Exercise 2: ``fn(block) -> (codes, absmax)`` for one block, against lora_lab.quant.

    ``codes`` are the indices into ``nf4_codebook()`` (the NF4 codes), ``absmax`` the block's
    largest |value|; both must equal ``quantize_nf4(block, blocksize=len(block))``'s exactly.
    """
    from lora_lab.quant import quantize_nf4

    cases = []
    for label, block in exercise_blocks():
        q = quantize_nf4(block, blocksize=block.numel())
        cases.append((label, {"block": block}, (q.codes.long(), float(q.absmax[0]))))
    return check_function(
        fn,
        cases,
        what="nf4_quantize_block",
        atol=0.0,
        why="scale by the block's absmax (guarded, so an all-zero block maps to the exact 0) and "
        "take the nearest of NF4's 16 levels: what quantize_nf4 does for every block.",
    )


def _signed_max_mean(n):
    """E[max z] over n independent N(0, 1) values (the largest value, not the largest |value|)."""
    x = torch.linspace(0, 12, 48_001, dtype=torch.float64)

    def cdf_n(t):  # P(max <= t)
        return (0.5 * (1 + torch.erf(t / math.sqrt(2)))) ** n

    return (torch.trapezoid(1 - cdf_n(x), x) - torch.trapezoid(cdf_n(-x), x)).item()


def block_absmax(answer, blocksize=16):
    """Exercise 4: the mean absmax of blocks of ``blocksize`` N(0, 1) values, measured (1%)."""
    from lora_lab.quant import expected_absmax, nf4_assumed_absmax

    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2:
        raise ValueError(f"blocksize must be an int of at least 2, got {blocksize!r}")
    expected = expected_absmax(blocksize)
    slips = [  # (value, why): a measurement within 1% of one of these made that slip
        (expected_absmax(64), "that is the absmax of blocks of 64; measure blocks of "
         f"{blocksize}."),
        (nf4_assumed_absmax(), "that is NF4's assumed absmax (1.85 std), not a measurement."),
        (_signed_max_mean(blocksize), "that is the largest value of a block; the absmax is "
         "the largest |value|."),
    ]  # fmt: skip
    if _is_number(answer):
        for value, why in slips:
            far = abs(value / expected - 1) > 0.03
            if far and math.isclose(answer, value, rel_tol=0.01):
                return Result(False, f"{answer:g} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the mean absmax of blocks of {blocksize}, in standard deviations",
        rel_tol=0.01,
        why=f"it is {expected:.3f} by the formula, nearer NF4's assumed "
        f"{nf4_assumed_absmax():.3f} than blocks of 64 ({expected_absmax(64):.3f}): smaller "
        "blocks use NF4's codes more evenly, at the price of more block constants.",
        hint="draw many blocks with torch.randn(n_blocks, blocksize), take .abs().amax(dim=1) "
        "and average; 100,000 blocks measure it to about 0.1%.",
    )


def normal_float_codebook(bits):
    """The ``2**bits`` NormalFloat levels by QLoRA's recipe (bits=4 gives NF4, up to rounding).

    ``2**(bits-1)`` positive and ``2**(bits-1) - 1`` negative normal quantiles at evenly spaced
    probabilities from 1/2 to p_max = 1 - (1/(2(2**bits - 1)) + 1/(2 * 2**bits)) / 2, plus 0,
    sorted and divided by the largest. Computed in float64.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    n = 2**bits
    p_max = 1 - (1 / (2 * (n - 1)) + 1 / (2 * n)) / 2
    half = n // 2
    pos = torch.special.ndtri(torch.linspace(p_max, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(p_max, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return levels / levels.max()


def nf3_codebook(answer):
    """Exercise 3: the 8 levels of 3-bit NormalFloat, sorted, in [-1, 1]."""
    expected = normal_float_codebook(3)
    if isinstance(answer, torch.Tensor) and answer.shape == expected.shape:
        a = answer.detach().double().cpu()
        if not torch.equal(a, a.sort().values):
            return Result(False, "the levels should be sorted from -1 to 1.")
        unnormalized = expected * torch.special.ndtri(
            torch.tensor(1 - (1 / 14 + 1 / 16) / 2, dtype=torch.float64)
        )
        if torch.allclose(a, unnormalized, atol=1e-5):
            return Result(
                False, "right quantiles, but divide them by the largest so they end at 1."
            )
        if (a == 0).sum() == 0:
            return Result(
                False,
                "there is no exact zero: NormalFloat puts one more level on the "
                "positive side and keeps 0.",
            )
    return check_tensor(
        answer,
        expected,
        what="the NF3 table",
        atol=1e-6,
        why="4 positive and 3 negative normal quantiles at evenly spaced probabilities, an "
        "exact 0, scaled to [-1, 1]: NF4's recipe with 8 levels.",
        hint="torch.special.ndtri of torch.linspace(p_max, 0.5, 5)[:-1] gives the positive "
        "side; use 4 points for the negative side, add 0, sort, divide by the maximum.",
    )
