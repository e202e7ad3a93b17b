"""Chapter 12's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here, not with the checkers' formulas.
"""

import pytest
import torch

from lora_lab.checks import ch12 as check

# Llama-2-7B: 32 blocks, hidden 4096, 6,738,415,616 parameters. Rank 16 on q_proj and v_proj:
ADAPTER_FP16 = 2 * 32 * 2 * 16 * (4096 + 4096)  # 16,777,216 bytes
BASE_FP16 = 2 * 6_738_415_616
PER_COPY = BASE_FP16 // ADAPTER_FP16  # 803


def grouped(x, weight, bias, adapters, adapter_names):
    """A right answer, written out: the base output, then each group's update."""
    y = x @ weight.T + (0 if bias is None else bias)
    out = y.clone()
    for name in set(adapter_names) - {None, "__base__"}:
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        A, B, scaling = adapters[name]
        out[rows] = y[rows] + scaling * (x[rows] @ A.T) @ B.T
    return out


def per_row(x, weight, bias, adapters, adapter_names):
    """Also right: one row at a time (slower, the same numbers)."""
    rows = []
    for i, name in enumerate(adapter_names):
        y = x[i] @ weight.T + (0 if bias is None else bias)
        if name not in (None, "__base__"):
            A, B, scaling = adapters[name]
            y = y + scaling * (x[i] @ A.T) @ B.T
        rows.append(y)
    return torch.stack(rows)


def test_mixed_forward_passes_right_answers():
    assert check.mixed_forward(grouped).correct
    assert check.mixed_forward(per_row).correct


def first_adapter_for_all(x, weight, bias, adapters, adapter_names):
    A, B, scaling = next(iter(adapters.values()))
    return x @ weight.T + (0 if bias is None else bias) + scaling * (x @ A.T) @ B.T


def no_scaling(x, weight, bias, adapters, adapter_names):
    return grouped(x, weight, bias, {n: (A, B, 1.0) for n, (A, B, _) in adapters.items()},
                   adapter_names)  # fmt: skip


def base_only_for_none(x, weight, bias, adapters, adapter_names):
    names = ["base" if n == "__base__" else n for n in adapter_names]
    return grouped(x, weight, bias, adapters, names)  # KeyError on "base"


@pytest.mark.parametrize(
    "fn, says",
    [
        (first_adapter_for_all, "case 1 of 5 (two adapters and a base row"),
        (no_scaling, "values differ"),
        (base_only_for_none, "case 2 of 5 ('__base__' names the base model too"),
    ],
)
def test_mixed_forward_names_the_failing_case(fn, says):
    result = check.mixed_forward(fn)
    assert not result.correct and says in result.message


def test_mixed_forward_unanswered():
    def stub(**kwargs):
        raise NotImplementedError

    assert "No answer yet" in check.mixed_forward(stub).message
    assert "No answer yet" in check.mixed_forward(None).message


def test_adapters_per_copy():
    assert PER_COPY == 803
    assert check.adapters_per_copy(PER_COPY).correct
    assert check.adapters_per_copy(float(PER_COPY)).correct
    assert check.adapters_per_copy(torch.tensor(PER_COPY)).correct
    assert not check.adapters_per_copy(PER_COPY + 1).correct
    assert not check.adapters_per_copy("803").correct
    assert "No answer yet" in check.adapters_per_copy(None).message


@pytest.mark.parametrize(
    "answer, says",
    [
        (BASE_FP16 // (2 * ADAPTER_FP16), "fp32"),
        (2 * PER_COPY, "A or B alone"),
        (PER_COPY // 32, "one block"),
        (PER_COPY + 1, "round down"),
    ],
)
def test_adapters_per_copy_names_the_slip(answer, says):
    result = check.adapters_per_copy(answer)
    assert not result.correct and says in result.message


def test_vllm_settings():
    assert check.vllm_settings({"max_loras": 3, "max_lora_rank": 64}).correct
    assert "No answer yet" in check.vllm_settings(None).message


@pytest.mark.parametrize(
    "answer, says",
    [
        ({"max_loras": 3, "max_lora_rank": 88}, "not their sum"),
        ({"max_loras": 3, "max_lora_rank": 16}, "vLLM refuses to load it"),
        ({"max_loras": 1, "max_lora_rank": 64}, "only 1 of the 3"),
        ({"max_loras": 8, "max_lora_rank": 128}, "more GPU memory than needed"),
        ({"max_loras": 3}, "a dict with the keys"),
        ((3, 64), "a dict with the keys"),
        ({"max_loras": 3.0, "max_lora_rank": 64}, "whole numbers"),
    ],
)
def test_vllm_settings_names_the_slip(answer, says):
    result = check.vllm_settings(answer)
    assert not result.correct and says in result.message
