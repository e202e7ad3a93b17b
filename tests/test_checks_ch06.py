"""Chapter 6's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out here without the checkers' own code: the bit count by hand,
the NF3 table from probabilities written out one by one, the NF4 block by a plain-Python search.
"""

import math

import pytest
import torch

from lora_lab.checks import ch06 as check
from lora_lab.quant import expected_absmax, nf4_assumed_absmax, nf4_codebook

# ----------------------------------------------------------------------------- exercise 1


def test_dq_bits_right_answers():
    assert check.dq_bits(4.0634765625).correct  # 4 + 8/128 + 32/32768, by hand
    assert check.dq_bits(4 + 1 / 16 + 1 / 1024).correct
    assert check.dq_bits(torch.tensor(4.0634765625)).correct
    assert check.dq_bits(4.126953125, blocksize=64).correct  # the chapter's 4.127
    assert check.dq_bits(4.03173828125, blocksize=256).correct  # 4 + 1/32 + 1/2048
    assert not check.dq_bits(4.0317, blocksize=256).correct  # rounded too far


@pytest.mark.parametrize(
    "answer, says",
    [
        (4.25, "float32"),  # 4 + 32/128: no double quantization
        (4.0625, "leaves out"),  # 4 + 8/128: no second-level scale
        (4.126953125, "blocks of 64"),
        (4.1875, "shared by 256"),  # 4 + 8/128 + 32/256
    ],
)
def test_dq_bits_names_the_slip(answer, says):
    result = check.dq_bits(answer)
    assert not result.correct and says in result.message


def test_dq_bits_wrong_and_unanswered():
    assert not check.dq_bits(4.07).correct
    assert not check.dq_bits("4.06").correct
    assert not check.dq_bits(True).correct
    result = check.dq_bits(None)
    assert not result.correct and "No answer yet" in result.message


def test_dq_bits_bad_blocksize():
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        check.dq_bits(4.0, blocksize=0)


# ----------------------------------------------------------------------------- exercise 2


def test_exercise_blocks_are_fixed_and_cover_the_edge_cases():
    a, b = check.exercise_blocks(), check.exercise_blocks()
    assert [label for label, _ in a] == [label for label, _ in b]
    assert all(
        torch.equal(x, y) and x.dtype == torch.float32 for (_, x), (_, y) in zip(a, b, strict=True)
    )
    blocks = dict(a)
    assert any((block == 0).all() for block in blocks.values())  # an all-zero block
    assert any(
        block.min() < 0 and block.abs().argmax() == block.argmin() for block in blocks.values()
    )
    assert any(block.abs().max() > 20 * block.abs().median() for block in blocks.values())


def _nearest_by_hand(block):
    """Codes and absmax in plain Python: the nearest level of value/absmax, a tie to the lower."""
    absmax = max(abs(v) for v in block.tolist())
    levels = nf4_codebook().tolist()
    codes = []
    for v in block.tolist():
        scaled = v / absmax if absmax > 0 else 0.0
        codes.append(min(range(16), key=lambda k: (abs(scaled - levels[k]), k)))
    return torch.tensor(codes), absmax


def _argmin_solution(block):
    levels = nf4_codebook()
    absmax = block.abs().max()
    scaled = block / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    return (scaled[:, None] - levels).abs().argmin(dim=1), absmax.item()


def _bucketize_solution(block):  # thresholds halfway between levels, absmax returned as a tensor
    levels = nf4_codebook()
    absmax = block.abs().max()
    scaled = block * (1 / absmax) if absmax > 0 else torch.zeros_like(block)
    return torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8), absmax


@pytest.mark.parametrize("solution", [_nearest_by_hand, _argmin_solution, _bucketize_solution])
def test_nf4_quantize_block_accepts_right_solutions(solution):
    result = check.nf4_quantize_block(solution)
    assert result.correct, result.message


def _no_guard(block):  # 0 / 0 is NaN: argmin then picks code 0, the level -1
    levels = nf4_codebook()
    absmax = block.abs().max()
    return (block[:, None] / absmax - levels).abs().argmin(dim=1), absmax.item()


def _max_not_absmax(block):  # block.max() misses a negative absmax
    levels = nf4_codebook()
    absmax = block.max()
    return (block[:, None] / absmax - levels).abs().argmin(dim=1), absmax.item()


def _int4_grid(block):  # sevenths instead of NF4's levels
    absmax = block.abs().max()
    return torch.round(block / absmax * 7).long() + 7, absmax.item()


def _dequantized(block):  # the values, not the codes
    codes, absmax = _argmin_solution(block)
    return nf4_codebook()[codes] * absmax, absmax


@pytest.mark.parametrize(
    "wrong, case",
    [
        (_no_guard, "case 3 of 5 (an all-zero block"),
        (_max_not_absmax, "case 2 of 5 (the largest |weight| is negative"),
        (_int4_grid, "case 1 of 5 (64 normal weights"),
        (_dequantized, "case 1 of 5 (64 normal weights"),
        (lambda block: _argmin_solution(block)[0], "case 1 of 5"),  # forgot the absmax
    ],
)
def test_nf4_quantize_block_names_the_first_wrong_case(wrong, case):
    result = check.nf4_quantize_block(wrong)
    assert not result.correct and case in result.message and "Expected" in result.message


def test_nf4_quantize_block_unanswered_and_not_a_function():
    def stub(block):
        raise NotImplementedError

    assert "No answer yet" in check.nf4_quantize_block(stub).message
    assert "No answer yet" in check.nf4_quantize_block(None).message
    assert "should be a function" in check.nf4_quantize_block(3).message


def test_nf4_quantize_block_reports_an_exception_as_a_case():
    result = check.nf4_quantize_block(lambda block: block.reshape(3, -1))
    assert (
        not result.correct and "case 1 of 5" in result.message and "RuntimeError" in result.message
    )


# ----------------------------------------------------------------------------- exercise 3


def _nf3_by_hand():
    """NF3 from the recipe, with the probabilities written out one by one."""
    p_max = 1 - (1 / 14 + 1 / 16) / 2
    step_pos, step_neg = (p_max - 0.5) / 4, (p_max - 0.5) / 3
    pos = [0.5 + j * step_pos for j in range(1, 5)]
    neg = [0.5 + j * step_neg for j in range(1, 4)]
    ppf = torch.special.ndtri
    levels = [-ppf(torch.tensor(p, dtype=torch.float64)).item() for p in neg] + [0.0]
    levels += [ppf(torch.tensor(p, dtype=torch.float64)).item() for p in pos]
    levels.sort()
    return torch.tensor(levels, dtype=torch.float64) / max(levels)


def test_nf3_codebook_right_answer():
    nf3 = _nf3_by_hand()
    assert nf3[0] == -1 and nf3[-1] == 1 and (nf3 == 0).sum() == 1 and (nf3 > 0).sum() == 4
    assert check.nf3_codebook(nf3).correct
    assert check.nf3_codebook(nf3.float()).correct


def test_normal_float_codebook_gives_nf4():
    """The checker's general recipe at 4 bits is bitsandbytes' NF4 table to rounding."""
    ours = check.normal_float_codebook(4).float()
    assert torch.allclose(ours, nf4_codebook(), atol=1e-6, rtol=0)
    assert math.isclose(check.normal_float_codebook(3)[5].item(), _nf3_by_hand()[5].item())


@pytest.mark.parametrize(
    "slip, says",
    [("unsorted", "sorted"), ("unnormalized", "divide them"), ("symmetric", "exact zero")],
)
def test_nf3_codebook_names_the_slip(slip, says):
    nf3 = _nf3_by_hand()
    if slip == "unsorted":
        answer = nf3.flip(0)
    elif slip == "unnormalized":
        answer = nf3 * torch.special.ndtri(
            torch.tensor(1 - (1 / 14 + 1 / 16) / 2, dtype=torch.float64)
        )
    else:  # 8 quantiles, 4 a side, no zero
        p = torch.linspace(1 - (1 / 14 + 1 / 16) / 2, 0.5, 5, dtype=torch.float64)[:-1]
        q = torch.special.ndtri(p)
        answer = torch.cat([-q, q]).sort().values / q.max()
    result = check.nf3_codebook(answer)
    assert not result.correct and says in result.message


def test_nf3_codebook_wrong_and_unanswered():
    nf3 = _nf3_by_hand()
    assert not check.nf3_codebook(nf4_codebook()).correct  # 16 levels, not 8
    wrong = nf3.clone()
    wrong[5] += 1e-3
    assert not check.nf3_codebook(wrong).correct
    assert "No answer yet" in check.nf3_codebook(None).message


def test_normal_float_codebook_bad_bits():
    with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
        check.normal_float_codebook(1)


# ----------------------------------------------------------------------------- exercise 4


def test_block_absmax_accepts_a_measurement():
    blocks = torch.randn(100_000, 16, generator=torch.Generator().manual_seed(3))
    measured = blocks.abs().amax(dim=1).mean().item()
    assert check.block_absmax(measured).correct
    assert check.block_absmax(torch.tensor(measured)).correct
    big = torch.randn(20_000, 64, generator=torch.Generator().manual_seed(4))
    assert check.block_absmax(big.abs().amax(dim=1).mean().item(), blocksize=64).correct


@pytest.mark.parametrize(
    "answer, says",
    [
        (2.596, "blocks of 64"),  # E[max |z|] over 64, not 16
        (1.848, "assumed"),  # NF4's Phi^-1(p_max)
        (1.766, "largest value"),  # E[max z] over 16: the signed maximum
    ],
)
def test_block_absmax_names_the_slip(answer, says):
    result = check.block_absmax(answer)
    assert not result.correct and says in result.message


def test_block_absmax_wrong_unanswered_and_bad_blocksize():
    assert not check.block_absmax(2.2).correct  # 6% off
    assert not check.block_absmax("2.08").correct
    assert "No answer yet" in check.block_absmax(None).message
    with pytest.raises(ValueError, match="blocksize must be an int of at least 2"):
        check.block_absmax(2.0, blocksize=1)


def test_the_slips_are_what_they_claim():
    """E[max |z|] over 16 by simulation is the checker's value; the slips are other numbers."""
    z = torch.randn(200_000, 16, generator=torch.Generator().manual_seed(5))
    assert abs(z.abs().amax(1).mean().item() / expected_absmax(16) - 1) < 0.003
    assert abs(z.amax(1).mean().item() / check._signed_max_mean(16) - 1) < 0.003
    assert abs(nf4_assumed_absmax() - 1.8481) < 1e-4
