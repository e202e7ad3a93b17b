"""Checkers for chapter 6, "QLoRA"."""

import math
import numbers

import torch

from lora_lab.checks import Result, check_number, check_tensor

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


def exercise_block():
    """The fixed block of 16 weights of exercise 2 (float32, roughly normal, one outlier)."""
    gen = torch.Generator().manual_seed(6)
    block = 0.02 * torch.randn(16, generator=gen)
    block[11] = -0.09  # the absmax, a negative one
    return block


def nf4_block(answer):
    """Exercise 2: the NF4 round trip of ``exercise_block()`` as one block of 16."""
    from lora_lab.quant import int4_codebook, nf4_codebook, quantize_nf4

    block = exercise_block()
    expected = quantize_nf4(block, blocksize=16).dequantize()
    if isinstance(answer, torch.Tensor) and answer.shape == expected.shape:
        answer64, absmax = answer.detach().double().cpu(), block.abs().max()
        levels = nf4_codebook()
        codes = (block[:, None] / absmax - levels).abs().argmin(dim=1)
        slips = [
            (levels[codes], "those are the levels: multiply each by the block's absmax."),
            (block / absmax, "that is each weight over the absmax, before rounding to a level."),
            (
                int4_codebook()[(block[:, None] / absmax - int4_codebook()).abs().argmin(dim=1)]
                * absmax,
                "that rounds to the int4 grid (sevenths); NF4's levels are "
                "lora_lab.nf4_codebook().",
            ),
        ]
        for value, why in slips:
            if torch.allclose(answer64, value.double(), atol=1e-6, rtol=0):
                return Result(False, why)
    return check_tensor(
        answer,
        expected,
        what="the dequantized block",
        atol=1e-6,
        why="each weight became the nearest NF4 level of weight/absmax, times the absmax; the "
        "largest weight comes back exactly.",
        hint="divide by block.abs().max(), pick the nearest of the 16 levels of "
        "lora_lab.nf4_codebook() for each value, and multiply back.",
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
