"""Argument checks shared by every module: each raises an error naming the argument, the value
and what is valid.

``name`` is the argument as the caller knows it (``"rank"``, ``"ModelSpec.hidden_size"``).
Wrong values raise ``ValueError``; ``boolean`` and ``module`` raise ``TypeError``, since a flag or
a model of the wrong type is a wrong kind of thing, not a value out of range. ``bool`` is never
accepted where a number is wanted (``True`` is an ``int`` in Python, never a rank).
"""

import math
import numbers


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def bad_choice(name, value, valid):
    """The ValueError ``choice`` raises, for callers that test membership themselves."""
    return ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


def choice(name, value, valid):
    """``value`` must be one of ``valid`` (a sequence, a dict's keys or a set)."""
    if value not in valid:
        raise bad_choice(name, value, valid)


def positive_int(name, value, *, limit=None):
    """An integer > 0 (not a bool); at most ``limit`` when given (no real model is larger)."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(
            f"{name} must be at most {limit:,} (no real model is larger), got {value!r}"
        )


def int_at_least(name, value, minimum=1):
    """An integer >= ``minimum`` (not a bool): a count of steps, tokens, examples."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def int_between(name, value, low, high, *, what=None):
    """An integer from ``low`` to ``high`` inclusive (not a bool); ``what`` names ``high``."""
    if not _is_int(value) or not low <= value <= high:
        top = f"{what}={high}" if what else f"{high}"
        raise ValueError(f"{name} must be an integer from {low} to {top}, got {value!r}")


def describe(value):
    """A tensor by shape and dtype, anything else by type and value: for error messages."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def matrix(name, value):
    """A 2-D floating-point ``torch.Tensor``."""
    import torch

    ok = isinstance(value, torch.Tensor) and value.ndim == 2 and value.is_floating_point()
    if not ok:
        raise ValueError(f"{name} must be a 2-D floating-point tensor, got {describe(value)}")


def integer(name, value):
    """Any integer (not a bool): a seed."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")


def finite_number(name, value, *, minimum=0.0, inclusive=False):
    """A finite real number (not a bool) above ``minimum``, or equal to it if ``inclusive``."""
    ok = _is_real(value) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {bound} {minimum}, got {value!r}")


def probability(name, value):
    """A real number in [0, 1): a dropout rate (1 would drop everything)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def boolean(name, value):
    """``True`` or ``False`` exactly (not 0, 1 or "yes"): raises TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def module(name, value):
    """A ``torch.nn.Module``: raises TypeError naming the type it got."""
    import torch

    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def module_with_parameters(name, value):
    """A ``torch.nn.Module`` with at least one parameter (something to train or run)."""
    module(name, value)
    if next(value.parameters(), None) is None:
        raise ValueError(f"{name} has no parameters")


__all__ = [
    "bad_choice",
    "boolean",
    "choice",
    "finite_number",
    "describe",
    "int_at_least",
    "int_between",
    "matrix",
    "integer",
    "module",
    "module_with_parameters",
    "positive_int",
    "probability",
]
