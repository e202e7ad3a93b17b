"""Checkers for chapter 3, "LoRA from scratch"."""

import math

import torch
import torch.nn as nn

from lora_lab.checks import Result, check_number, check_tensor, unanswered

_RULES = ("standard", "rslora")


def lesson_trainable(answer, in_features=1024, out_features=4096, rank=16):
    """Exercise 1: what the lesson's count prints for its LoRALinear around a biased nn.Linear."""
    factors = rank * (in_features + out_features)
    expected = factors + out_features  # the bias stays trainable in the lesson's code
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if number and answer == factors:
        return Result(
            False,
            f"{factors:,} is A and B alone. The lesson freezes linear.weight only, so the "
            f"bias ({out_features:,} numbers) still has requires_grad=True and is counted.",
        )
    if number and answer == expected + in_features * out_features:
        return Result(False, "that counts the base weight too, but the lesson does freeze it.")
    return check_number(
        answer,
        expected,
        what=f"the lesson's trainable count at rank {rank}",
        why=f"A ({in_features}x{rank}) and B ({rank}x{out_features}) give {factors:,}, and the "
        f"unfrozen bias adds {out_features:,}.",
        hint="count A (in x r), B (r x out), then ask which of the base layer's two parameters "
        "the lesson's code leaves trainable.",
    )


def norm_ratio(answer, r_from=4, r_to=64, rule="standard"):
    """Exercise 2: expected ||scaling * B A||_F at ``r_to`` over its value at ``r_from``."""
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    if answer is None:
        return unanswered(
            "||B A||_F grows like sqrt(r) when A and B keep their distributions; "
            "multiply by the scaling rule and take the ratio."
        )
    grows = math.sqrt(r_to / r_from)  # ||B A||_F ratio
    expected = grows / (r_to / r_from) if rule == "standard" else 1.0
    slips = [  # first match wins
        (1 / expected, "that is the inverse: the larger rank goes on top."),
        (r_from / r_to, "that is the ratio of the scalings alone; B A itself grows like sqrt(r)."),
        (grows, "that is how ||B A||_F grows; the scaling divides it again."),
    ]
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    for value, why in slips:
        if number and value != expected and math.isclose(answer, value, rel_tol=1e-3):
            return Result(False, f"{answer:g} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the {rule} rule's norm ratio, rank {r_to} over rank {r_from}",
        rel_tol=1e-3,
        why="alpha/r makes the update shrink like 1/sqrt(r); rsLoRA's alpha/sqrt(r) cancels the "
        "sqrt(r) growth of B A, so its size does not depend on the rank.",
    )


def exercise_layer():
    """A small, fixed lora_lab.LoRALinear (6 -> 5, rank 2, alpha 3) whose B is not zero."""
    from lora_lab.lora import LoRALinear

    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3)
    with torch.no_grad():
        for p in (base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


def merged_weight(answer):
    """Exercise 3: the weight that ``exercise_layer().merge()`` would leave in the base layer."""
    layer = exercise_layer()
    W = layer.base_layer.weight.detach().double()
    A, B = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    expected = W + layer.scaling * B @ A  # (out, in)
    if isinstance(answer, torch.Tensor) and answer.shape == expected.shape:
        answer64 = answer.detach().double().cpu()
        if torch.allclose(answer64, W + B @ A, atol=1e-5):
            return Result(
                False, f"you added B @ A without the scaling alpha/r = {layer.scaling:g}."
            )
        if torch.allclose(answer64, W, atol=1e-5):
            return Result(False, "that is the base weight unchanged; add the update.")
    return check_tensor(
        answer,
        expected,
        what="the merged weight",
        atol=1e-5,
        why="merging adds scaling * B @ A, an (out, in) matrix, to W.",
        hint="lora_B.weight is (out, r) and lora_A.weight is (r, in): multiply them in the order "
        "that gives (out, in), then scale.",
    )
