"""The shared checker for code exercises: it reports the first wrong case, never a traceback."""

import torch

from lora_lab.checks import check_function

CASES = [
    ("zeros", {"x": torch.zeros(2)}, torch.zeros(2)),
    ("a ramp", {"x": torch.arange(3.0)}, torch.arange(3.0) * 2),
]


def test_a_right_function_passes_every_case():
    result = check_function(lambda x: 2 * x, CASES, what="double", why="x + x.")
    assert result.correct and "all 2 cases" in result.message


def test_the_first_wrong_case_is_named_with_inputs_expected_and_got():
    result = check_function(lambda x: x + 1, CASES, what="double", why="x + x.")
    assert not result.correct
    assert "case 1 of 2 (zeros; x=tensor([0.0, 0.0]))" in result.message
    assert "Expected tensor([0.0, 0.0]), got tensor([1.0, 1.0])" in result.message
    later = check_function(lambda x: x * x, CASES, what="double", why="x + x.")
    assert "case 2 of 2 (a ramp" in later.message and "differ by up to 1 " in later.message


def test_shape_type_and_exception_are_reported():
    shape = check_function(lambda x: x.unsqueeze(0), CASES, what="double", why="")
    assert "shape (2,) was expected, got (1, 2)" in shape.message
    kind = check_function(lambda x: x.tolist(), CASES, what="double", why="")
    assert "a torch.Tensor was expected, got list" in kind.message
    boom = check_function(lambda x: x @ torch.ones(5), CASES, what="double", why="")
    assert not boom.correct and "raised RuntimeError" in boom.message and "case 1" in boom.message


def test_a_placeholder_is_unanswered_and_a_non_function_is_named():
    def todo(x):
        raise NotImplementedError

    stub = check_function(todo, CASES, what="double", why="hint").message
    assert stub.startswith("No answer yet: replace `raise NotImplementedError` with your code")
    assert "No answer yet" in check_function(None, CASES, what="double", why="hint").message
    assert "should be a function, got int 3" in check_function(3, CASES, what="d", why="").message


def test_tuples_and_numbers_are_compared_element_by_element():
    cases = [("pair", {"a": 2.0}, (torch.tensor([2.0]), 4.0))]
    good = check_function(lambda a: (torch.tensor([a]), a * a), cases, what="p", why="")
    assert good.correct
    bad = check_function(lambda a: (torch.tensor([a]), a + a + 1), cases, what="p", why="")
    assert "result 1: differs" in bad.message
    nan = check_function(lambda a: (torch.tensor([float("nan")]), 4.0), cases, what="p", why="")
    assert "NaN or inf" in nan.message


def test_named_slip_names_the_first_matching_slip_only():
    from lora_lab.checks import named_slip

    slips = [(2.0, "doubled."), (0.5, "halved."), (1.0, "the answer itself is no slip.")]
    assert named_slip(2.0005, 1.0, slips).message == "2.0005 is not it: doubled."
    assert named_slip(0.5, 1.0, slips).message.endswith("halved.")
    assert named_slip(1.0, 1.0, slips) is None  # a slip equal to the expected value never fires
    assert named_slip(3.0, 1.0, slips) is None and named_slip("2", 1.0, slips) is None
    assert named_slip(True, 1.0, [(1.0, "bool")]) is None
