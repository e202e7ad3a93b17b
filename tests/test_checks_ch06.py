"""Chapter 6's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out here without the checkers' own code: the bit count by hand,
the NF3 table from probabilities written out one by one, the NF4 block by a plain-Python search.
"""

import math

import pytest
import torch

from lora_lab.checks import ch06 as check
from lora_lab.quant import int4_codebook, nf4_codebook

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


def test_exercise_block_is_fixed():
    a, b = check.exercise_block(), check.exercise_block()
    assert torch.equal(a, b) and a.shape == (16,) and a.dtype == torch.float32
    assert a.abs().argmax() == 11 and a[11] == -0.09


def _by_hand(block, table):
    """Nearest level of each value/absmax, in plain Python, times the absmax."""
    absmax = max(abs(v) for v in block.tolist())
    levels = table.tolist()
    out = []
    for v in block.tolist():
        best = min(levels, key=lambda q: (abs(v / absmax - q), q))  # a tie: the lower level
        out.append(best * absmax)
    return torch.tensor(out)


def test_nf4_block_right_answer():
    block = check.exercise_block()
    assert check.nf4_block(_by_hand(block, nf4_codebook())).correct
    assert check.nf4_block(_by_hand(block, nf4_codebook()).double()).correct


@pytest.mark.parametrize(
    "slip, says", [("levels", "multiply each"), ("scaled", "before rounding"), ("int4", "int4")]
)
def test_nf4_block_names_the_slip(slip, says):
    block = check.exercise_block()
    absmax = block.abs().max()
    answer = {
        "levels": _by_hand(block, nf4_codebook()) / absmax,
        "scaled": block / absmax,
        "int4": _by_hand(block, int4_codebook()),
    }[slip]
    result = check.nf4_block(answer)
    assert not result.correct and says in result.message


def test_nf4_block_wrong_shape_values_and_unanswered():
    right = _by_hand(check.exercise_block(), nf4_codebook())
    assert not check.nf4_block(right + 1e-3).correct
    assert not check.nf4_block(right[:8]).correct
    assert not check.nf4_block(right.tolist()).correct
    assert "No answer yet" in check.nf4_block(None).message


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
