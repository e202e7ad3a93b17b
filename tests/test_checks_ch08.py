"""Chapter 8's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand from the shipped model's shapes (4 blocks, d = 128,
828,544 parameters) and from FLOP counts, not with the checkers' code.
"""

import pytest

from lora_lab.checks import ch08 as check

N = 828_544  # the shipped GPT's parameters
QV16 = 4 * 2 * 16 * (128 + 128)  # LoRA on q_proj and v_proj at rank 16: 32,768


def test_shipped_model_is_the_one_worked_out_by_hand():
    from lora_lab import load_pretrained

    assert sum(p.numel() for p in load_pretrained(device="cpu").parameters()) == N


def test_lora_state_bytes():
    right = 4 * N + 16 * QV16
    assert right == 3_838_464
    assert check.lora_state_bytes(right).correct
    assert check.lora_state_bytes(right + 4 * 32).correct  # AdamW's step counters: a rounding
    assert check.lora_state_bytes(4 * N + 16 * 2 * QV16, rank=32).correct
    assert not check.lora_state_bytes(right * 1.01).correct
    assert not check.lora_state_bytes(None).correct
    assert not check.lora_state_bytes("3838464").correct


@pytest.mark.parametrize("answer, says", [(16 * (N + QV16), "frozen"), (16 * QV16, "adapter's")])
def test_lora_state_bytes_names_the_slip(answer, says):
    result = check.lora_state_bytes(answer)
    assert not result.correct and says in result.message


def test_speedup_bound():
    d, r = 4096, 16
    right = 6 * d * d / (4 * d * d + 12 * d * r)
    assert right == pytest.approx(1.4826, abs=1e-4)
    assert check.speedup_bound(right).correct
    assert check.speedup_bound(round(right, 4)).correct
    assert not check.speedup_bound(1.4).correct
    assert not check.speedup_bound(None).correct
    assert "A and B" in check.speedup_bound(1.5).message
    assert "input" in check.speedup_bound(3.0).message


def test_break_even_rank():
    right = 12 * N / (16 * 4 * 4 * 2 * 128)  # 4N + 16 r (4 blocks x 4 projections x 2d) = 16N
    assert right == pytest.approx(151.7, abs=0.05)
    result = check.break_even_rank(right)
    assert result.correct and "128" in result.message
    assert check.break_even_rank(151.7).correct
    assert not check.break_even_rank(128).correct
    assert not check.break_even_rank(None).correct
    slip = check.break_even_rank(N / (4 * 4 * 2 * 128))
    assert not slip.correct and "frozen" in slip.message
