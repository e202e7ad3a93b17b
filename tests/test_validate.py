"""lora_lab.validate: each check names the argument, the value and what is valid."""

import math

import pytest
import torch

from lora_lab import validate


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None])
def test_positive_int_refuses(value):
    with pytest.raises(ValueError, match=rf"^rank must be a positive integer, got {value!r}$"):
        validate.positive_int("rank", value)


def test_positive_int_accepts_and_limits():
    validate.positive_int("rank", 3)
    validate.positive_int("n", 10, limit=10)
    with pytest.raises(
        ValueError, match=r"^n must be at most 10 \(no real model is larger\), got 11$"
    ):
        validate.positive_int("n", 11, limit=10)


def test_int_at_least_and_integer():
    validate.int_at_least("seed", 0, minimum=0)
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1, got 0$"):
        validate.int_at_least("steps", 0)
    with pytest.raises(ValueError, match=r"^seed must be an int >= 0, got False$"):
        validate.int_at_least("seed", False, minimum=0)
    validate.integer("seed", -5)
    with pytest.raises(ValueError, match=r"^seed must be an int, got 1.5$"):
        validate.integer("seed", 1.5)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1"])
def test_finite_number_refuses(value):
    with pytest.raises(ValueError, match=rf"^lr must be a finite number > 0.0, got {value!r}$"):
        validate.finite_number("lr", value)


def test_finite_number_inclusive_bound():
    validate.finite_number("weight_decay", 0.0, inclusive=True)
    with pytest.raises(ValueError, match=r"^temperature must be a finite number >= 0, got -1$"):
        validate.finite_number("temperature", -1, minimum=0, inclusive=True)


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1"])
def test_probability_refuses(value):
    with pytest.raises(ValueError, match=rf"^dropout must be a number in \[0, 1\), got {value!r}$"):
        validate.probability("dropout", value)


def test_probability_accepts_zero():
    validate.probability("dropout", 0.0)
    validate.probability("dropout", 0)


@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_boolean_refuses_with_type_error(value):
    with pytest.raises(TypeError, match=rf"^flag must be True or False, got {value!r}$"):
        validate.boolean("flag", value)


def test_choice_names_the_valid_values():
    validate.choice("unit", "GB", ("GB", "GiB"))
    with pytest.raises(ValueError, match=r"^unit must be one of \['GB', 'GiB'\], got 'MB'$"):
        validate.choice("unit", "MB", ("GB", "GiB"))
    assert str(validate.bad_choice("x", 1, {"a": 0})) == "x must be one of ['a'], got 1"


def test_module_checks():
    validate.module_with_parameters("model", torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got int$"):
        validate.module("model", 3)
    with pytest.raises(ValueError, match=r"^base has no parameters$"):
        validate.module_with_parameters("base", torch.nn.ReLU())


def test_int_between_and_matrix_name_the_value_and_the_range():
    validate.int_between("r", 0, 0, 4)
    validate.int_between("r", 4, 0, 4)
    for bad in (5, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"r must be an integer from 0 to min\(M.shape\)=4"):
            validate.int_between("r", bad, 0, 4, what="min(M.shape)")
    validate.matrix("W", torch.zeros(2, 3))
    for bad, shown in [(torch.zeros(3), "shape (3,)"), (torch.zeros(2, 2, dtype=torch.long),
                       "torch.int64"), ([[1.0]], "list [[1.0]]")]:  # fmt: skip
        with pytest.raises(ValueError, match=r"W must be a 2-D floating-point tensor, got .*"):
            validate.matrix("W", bad)
        assert shown in validate.describe(bad)


def test_low_rank_approx_uses_the_shared_checks():
    from lora_lab.lowrank import energy_captured, low_rank_approx

    with pytest.raises(ValueError, match=r"r must be an integer from 0 to min\(M.shape\)=2, got 3"):
        low_rank_approx(torch.ones(2, 5), 3)
    with pytest.raises(ValueError, match=r"r must be an integer from 0 to len\(S\)=2, got -1"):
        energy_captured(torch.ones(2), -1)


def test_read_json_result_absent_valid_and_damaged(tmp_path):
    from lora_lab.files import read_json_result

    assert read_json_result(tmp_path / "none.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_result(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json_result(tmp_path / "bad.json")
