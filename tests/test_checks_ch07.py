"""Chapter 7's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here (not with the checkers' own formulas), so a slip
in either shows.
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.checks import ch07 as check

# Llama-2-13B: 40 blocks, hidden 5120; q_proj and v_proj are 5120 x 5120.
NUMBERS_13B = 40 * 2 * 16 * (5120 + 5120)  # 13,107,200 at rank 16
BYTES_13B = 2 * NUMBERS_13B  # bf16


def test_adapter_bytes_13b():
    assert BYTES_13B == 26_214_400
    assert check.adapter_bytes_13b(BYTES_13B).correct
    assert check.adapter_bytes_13b(float(BYTES_13B)).correct
    assert check.adapter_bytes_13b(torch.tensor(BYTES_13B)).correct
    assert check.adapter_bytes_13b(4 * 40 * 2 * 8 * 10240, rank=8, bytes_per_number=4).correct
    assert not check.adapter_bytes_13b(BYTES_13B + 2).correct


@pytest.mark.parametrize(
    "answer, says",
    [(NUMBERS_13B, "bytes per number"), (2 * BYTES_13B, "fp32"), (BYTES_13B // 40, "one block")],
)
def test_adapter_bytes_13b_names_the_slip(answer, says):
    result = check.adapter_bytes_13b(answer)
    assert not result.correct and says in result.message


def test_adapter_bytes_13b_unanswered_and_bad_types():
    result = check.adapter_bytes_13b(None)
    assert not result.correct and "No answer yet" in result.message
    assert not check.adapter_bytes_13b(str(BYTES_13B)).correct
    assert not check.adapter_bytes_13b(True).correct


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16)}
    save_file(tensors, path, metadata={"format": "pt"})
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return path, os.path.getsize(path) - data  # the data is the file's last bytes


def test_data_start(st_file):
    path, start = st_file
    assert start % 8 == 0 and start > 8
    assert check.data_start(start, path).correct
    assert check.data_start(start, str(path)).correct
    assert not check.data_start(start + 1, path).correct
    result = check.data_start(None, path)
    assert not result.correct and "No answer yet" in result.message


def test_data_start_names_the_slip(st_file):
    path, start = st_file
    result = check.data_start(start - 8, path)  # the header length alone
    assert not result.correct and "8-byte length" in result.message
    result = check.data_start(8, path)
    assert not result.correct and "JSON header begins" in result.message


def test_data_start_bad_path(tmp_path):
    with pytest.raises(TypeError, match="path"):
        check.data_start(8, 123)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        check.data_start(8, short)


def test_ignored_by_strict_false():
    # 4 blocks x (gate, up, down) x (lora_A, lora_B)
    assert check.ignored_by_strict_false(24).correct
    assert not check.ignored_by_strict_false(25).correct
    result = check.ignored_by_strict_false(None)
    assert not result.correct and "No answer yet" in result.message


@pytest.mark.parametrize(
    "answer, says", [(12, "two tensors"), (6, "one block"), (56, "every tensor")]
)
def test_ignored_by_strict_false_names_the_slip(answer, says):
    result = check.ignored_by_strict_false(answer)
    assert not result.correct and says in result.message
