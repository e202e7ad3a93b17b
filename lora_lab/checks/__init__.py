"""Exercise checkers: each says right or wrong, and why.

Every chapter has a module here (``ch02``, ``ch03``...), imported in the
notebook as ``from lora_lab.checks import ch02 as check``. A checker computes
the expected answer itself, compares, and returns a :class:`Result` whose
printout is one line a learner can act on.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Result:
    """The verdict of one checker: ``correct`` and a one-line explanation."""

    correct: bool
    message: str

    def __bool__(self):
        return self.correct

    def require(self):
        """This result if it is right; else AssertionError with its message.

        Every solution cell ends with ``check.<exercise>(...).require()``, so CI, which runs the
        solutions, fails when a solution (or its checker) goes wrong.
        """
        if not self.correct:
            raise AssertionError(f"the checker rejects this solution: {self.message}")
        return self

    def __repr__(self):
        return ("Right! " if self.correct else "Not yet. ") + self.message

    __str__ = __repr__


def unanswered(hint):
    """The verdict for an exercise still holding its placeholder ``None``."""
    return Result(False, f"No answer yet: replace None with your answer. Hint: {hint}")


def check_number(answer, expected, *, what, why, rel_tol=1e-6, hint=""):
    """Compare a number with the expected one to ``rel_tol``; say why it matters."""
    if answer is None:
        return unanswered(hint or why)
    if isinstance(answer, torch.Tensor):
        if answer.numel() != 1:
            return Result(
                False,
                f"{what} should be a single number, got a tensor of shape {tuple(answer.shape)}.",
            )
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return Result(False, f"{what} should be a number, got {type(answer).__name__} {answer!r}.")
    if math.isclose(answer, expected, rel_tol=rel_tol, abs_tol=1e-12):
        return Result(True, f"{what} = {answer:,.6g}. {why}")
    return Result(False, f"{what} is {expected:,.6g}, you have {answer:,.6g}. {hint or why}")


def check_tensor(answer, expected, *, what, why, atol=1e-5, hint=""):
    """Compare a tensor with the expected one: shape first, then values to ``atol``."""
    if answer is None:
        return unanswered(hint or why)
    if not isinstance(answer, torch.Tensor):
        return Result(False, f"{what} should be a torch.Tensor, got {type(answer).__name__}.")
    if answer.shape != expected.shape:
        return Result(
            False,
            f"{what} should have shape {tuple(expected.shape)}, got {tuple(answer.shape)}. {hint}",
        )
    err = (answer.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
    if err <= atol:
        return Result(True, f"{what} matches (largest difference {err:.1e}). {why}")
    return Result(
        False, f"{what} has the right shape but differs by up to {err:.3g}. {hint or why}"
    )
