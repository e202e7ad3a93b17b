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


def unanswered(hint, placeholder="None"):
    """The verdict for an exercise still holding its placeholder (``None``, or a function that
    raises ``NotImplementedError``)."""
    if placeholder == "None":
        return Result(False, f"No answer yet: replace None with your answer. Hint: {hint}")
    return Result(False, f"No answer yet: replace {placeholder} with your code. Hint: {hint}")


def named_slip(answer, expected, slips, rel_tol=1e-3):
    """The wrong Result for the first known slip ``answer`` matches, or None.

    ``slips`` is a list of ``(value, why)``: an answer within ``rel_tol`` of ``value`` (a
    value that is not itself the expected one) gets "<answer> is not it: <why>".
    """
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return None
    for value, why in slips:
        close = math.isclose(answer, value, rel_tol=rel_tol)
        if close and not math.isclose(value, expected, rel_tol=rel_tol):
            return Result(False, f"{answer:g} is not it: {why}")
    return None


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


def _describe(value, limit=120):
    """A short printable form of an input or a result, for a checker's message."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            text = f"tensor({[round(v, 6) for v in value.detach().flatten().double().tolist()]})"
            return text if value.dim() <= 1 else f"{text} of shape {tuple(value.shape)}"
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same(got, expected, atol):
    """Why ``got`` differs from ``expected`` (tensors to ``atol``, numbers too), or None."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"a torch.Tensor was expected, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"shape {tuple(expected.shape)} was expected, got {tuple(got.shape)}"
        diff = (got.detach().double().cpu() - expected.detach().double().cpu()).abs()
        if not torch.isfinite(diff).all():
            return "the result holds NaN or inf"
        if diff.max().item() > atol:
            return f"values differ by up to {diff.max().item():.3g} (allowed {atol:g})"
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{len(expected)} results were expected, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            why = _same(g, e, atol)
            if why:
                return f"result {i}: {why}"
        return None
    if isinstance(expected, float) and not isinstance(expected, bool):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"a number was expected, got {type(got).__name__}"
        return None if math.isclose(got, expected, rel_tol=atol, abs_tol=atol) else "differs"
    return None if got == expected else "differs"


def check_function(fn, cases, *, what, why, atol=1e-5):
    """Run a learner's function on ``cases`` and report the first one it gets wrong.

    ``cases`` is a list of ``(label, kwargs, expected)``: the function is called as
    ``fn(**kwargs)`` and its result compared with ``expected`` (tensors to ``atol``, tuples
    element by element, anything else with ``==``). An exception is a wrong case too, reported
    with its type and message rather than a traceback. A function that still raises
    ``NotImplementedError`` (the exercise's placeholder) is unanswered.
    """
    if fn is None:
        return unanswered(why)
    stub = "`raise NotImplementedError`"
    if not callable(fn):
        return Result(False, f"{what} should be a function, got {type(fn).__name__} {fn!r}.")
    for i, (label, kwargs, expected) in enumerate(cases, start=1):
        inputs = ", ".join(f"{k}={_describe(v, 60)}" for k, v in kwargs.items())
        try:
            got = fn(**kwargs)
        except NotImplementedError:
            return unanswered(why, placeholder=stub)
        except Exception as error:  # the learner's bug, reported as a case
            return Result(
                False,
                f"{what}, case {i} of {len(cases)} ({label}; {inputs}): raised "
                f"{type(error).__name__}: {error}",
            )
        problem = _same(got, expected, atol)
        if problem:
            return Result(
                False,
                f"{what}, case {i} of {len(cases)} ({label}; {inputs}): {problem}. "
                f"Expected {_describe(expected)}, got {_describe(got)}.",
            )
    return Result(True, f"{what} passes all {len(cases)} cases. {why}")
