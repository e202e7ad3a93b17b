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
