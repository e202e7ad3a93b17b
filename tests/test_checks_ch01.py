"""Chapter 1's exercise checkers: right answers pass, slips are named, None is unanswered.

The expected values here are computed by hand from Llama-2's published architecture numbers,
not with the estimator the checkers use, so a bug in either shows.
"""

import pytest

from lora_lab.checks import ch01 as check

# Llama-2's config.json numbers: vocab, hidden, MLP width, layers
LLAMA2 = {"llama-2-7b": (32000, 4096, 11008, 32), "llama-2-13b": (32000, 5120, 13824, 40)}


def llama_counts(model):
    """(all parameters, weights of the blocks' linear layers) of a Llama-2 model, by hand."""
    V, d, inter, L = LLAMA2[model]
    linear = L * (4 * d * d + 3 * d * inter)
    return 2 * V * d + linear + L * 2 * d + d, linear


def nf4_bytes_by_hand(numel):
    """Packed codes, codebook, 8-bit absmax per 64, fp32 absmax per 256 of those, code, offset."""
    blocks = -(-numel // 64)
    return -(-numel // 2) + 64 + blocks + 4 * -(-blocks // 256) + 1024 + 4


def test_full_finetune_gb():
    n, _ = llama_counts("llama-2-13b")
    assert n == 13_015_864_320
    tensors = 2 + 40 * 9 + 1  # embed, lm_head; 7 linear + 2 norms per block; final norm
    expected = (8 * n + 4 * tensors) / 1e9  # fp16 weight, grad, 2 states; an fp32 step each
    assert check.full_finetune_gb(expected).correct
    assert check.full_finetune_gb(round(expected, 1)).correct  # rounding to 0.1 GB is fine
    assert check.full_finetune_gb(16 * n / 1e9, precision="fp32").correct
    assert not check.full_finetune_gb(expected * 1.01).correct


@pytest.mark.parametrize(
    "answer, says",
    [
        (8 * 13e9 / 1e9, "not 13,000,000,000"),  # the name's round count
        (8 * 13_015_864_320 / 2**30, "GiB"),
        (16 * 13_015_864_320 / 1e9, "mixed precision"),
        (4 * 13_015_864_320 / 1e9, "states"),
    ],
)
def test_full_finetune_gb_names_the_slip(answer, says):
    result = check.full_finetune_gb(answer)
    assert not result.correct and says in result.message


def test_lora_share():
    n, _ = llama_counts("llama-2-7b")
    lora = 32 * 4 * 16 * (4096 + 4096)  # 4 square projections per block, r * (in + out)
    assert check.lora_share(100 * lora / n).correct
    assert check.lora_share(round(100 * lora / n, 3)).correct
    assert check.lora_share(100 * lora / 2 / n, rank=8).correct
    assert not check.lora_share(100 * lora / n * 1.01).correct
    for answer, says in [
        (lora / n, "percentage"),
        (100 * lora / (n + lora), "base + adapters"),
        (100 * lora / 2 / n, "rank 8"),
        (100 * 32 * 2 * 16 * 8192 / n, "q_proj and v_proj"),  # the same number as rank 8
    ]:
        result = check.lora_share(answer)
        assert not result.correct and says in result.message, (answer, result)


def test_qlora_weight_gb():
    n, linear = llama_counts("llama-2-7b")
    d, inter = 4096, 11008
    per_layer = 4 * nf4_bytes_by_hand(d * d) + 3 * nf4_bytes_by_hand(d * inter)
    expected = (32 * per_layer + 2 * (n - linear)) / 1e9  # the rest at bf16
    assert check.qlora_weight_gb(expected).correct
    assert check.qlora_weight_gb(round(expected, 2)).correct  # 3.87
    assert check.qlora_weight_gb(expected, precision="fp16").correct  # as many bytes as bf16
    assert not check.qlora_weight_gb(expected * 1.01).correct
    for answer, says in [
        ((linear / 2 + 2 * (n - linear)) / 1e9, "block constants"),
        ((linear * (0.5 + 4 / 64) + 2 * (n - linear)) / 1e9, "without double quantization"),
        (expected * 1e9 / 2**30, "GiB"),
        (n * 32 * per_layer / linear / 1e9, "embeddings, norms and lm_head"),  # all in NF4
    ]:
        result = check.qlora_weight_gb(answer)
        assert not result.correct and says in result.message, (answer, result)


@pytest.mark.parametrize("fn", [check.full_finetune_gb, check.lora_share, check.qlora_weight_gb])
def test_unanswered_and_not_a_number(fn):
    result = fn(None)
    assert not result.correct and result.message.startswith("No answer yet")
    for bad in ["3.9", True, [1.0]]:
        result = fn(bad)
        assert not result.correct and "should be a number" in result.message


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        check.full_finetune_gb(1.0, model="llama-3")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        check.lora_share(1.0, rank=0)
