"""Checkers for chapter 3, "LoRA from scratch"."""

import copy
import math

import torch
import torch.nn as nn

from lora_lab.checks import Result, check_function, check_number, check_tensor, unanswered

_RULES = ("alpha/r", "alpha/sqrt(r)")  # the names lora_lab.scaling uses
_OPTIMIZERS = ("adamw", "sgd")
_CARRIES = {  # how often the scaling s enters the first step's update
    "adamw": "AdamW's step has the size of lr whatever the gradient, so s enters once, in s B A.",
    "sgd": "SGD's step is lr times the gradient, which carries s, and s enters again in s B A.",
}


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


def _scale(rule, rank):
    return 1 / math.sqrt(rank) if rule == "alpha/sqrt(r)" else 1 / rank  # alpha cancels


def first_step_ratio(answer, r_from=4, r_to=64, rule="alpha/r", optimizer="adamw"):
    """Exercise 2: how the part of the first step's update along -G changes from ``r_from`` to
    ``r_to`` (in expectation), with B = 0 and A's distribution the same at every rank.

    AdamW's first step sets every entry of B to -lr * sign(its gradient): that part is
    ``s * lr * sum_k |G a_k|_1``, proportional to ``s * r``. SGD's step is lr times the gradient,
    itself proportional to s: ``lr * s**2 * sum_k ||G a_k||**2``, proportional to ``s**2 * r``.
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    power = 1 if optimizer == "adamw" else 2  # the step carries s once (AdamW) or twice (SGD)
    s_from, s_to = _scale(rule, r_from), _scale(rule, r_to)
    expected = (s_to**power * r_to) / (s_from**power * r_from)
    grow = r_to / r_from
    hint = (
        "B's first step is -lr * sign(gradient) under AdamW (its size does not depend on s), "
        "lr * gradient under SGD (the gradient carries s); the r rank-one terms of B A all push "
        "along -G, so that part adds up over the rank. Multiply by the scaling rule."
    )
    if answer is None:
        return unanswered(hint)
    other_power = 2 if power == 1 else 1
    other = "alpha/r" if rule == "alpha/sqrt(r)" else "alpha/sqrt(r)"
    other_rule = (_scale(other, r_to) ** power * r_to) / (_scale(other, r_from) ** power * r_from)
    slips = [  # (value, why), first match wins
        (_scale(rule, r_to) / _scale(rule, r_from) * math.sqrt(grow),
         "that is how the whole update's Frobenius norm changes: the r terms point in unrelated "
         "directions away from -G and add up like sqrt(r); along -G they all push the same way "
         "and add up like r."),
        ((s_to**other_power * r_to) / (s_from**other_power * r_from),
         f"that is the answer for the other optimizer; {_CARRIES[optimizer]}"),
        (other_rule, "that is the other scaling rule's answer; check which rule you used."),
        (s_to / s_from, "that is the ratio of the scalings alone; the sum over the rank counts too."),
        (grow, "that is the ratio of the ranks alone; the scaling divides it."),
        (1 / expected, "that is the inverse: the larger rank goes on top."),
    ]  # fmt: skip
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    for value, why in slips:
        if number and not math.isclose(value, expected, rel_tol=1e-3):
            if math.isclose(answer, value, rel_tol=1e-3):
                return Result(False, f"{answer:g} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the ratio under {rule} and {optimizer}, rank {r_to} over rank {r_from}",
        rel_tol=1e-3,
        why="AdamW: s * r; SGD: s**2 * r. So alpha/r keeps AdamW's first step the same at every "
        "rank and shrinks SGD's like 1/r; alpha/sqrt(r) grows AdamW's like sqrt(r) and keeps "
        "SGD's the same (rsLoRA's 'rank-stabilised').",
        hint=hint,
    )


# ----------------------------------------------------------------------------- the layer


def _reference(in_features, out_features, rank, alpha, use_rslora=False, dropout=0.0, seed=0):
    """lora_lab's LoRALinear with every weight random (B too), from ``seed``."""
    from lora_lab.lora import LoRALinear

    gen = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features), rank, alpha, dropout, use_rslora)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return layer


_LAYERS = [  # label, (in, out, rank, alpha, use_rslora), input shape
    ("rank 1, square", (8, 8, 1, 2, False), (3, 8)),
    ("non-square 6 -> 10, rank 2, a batch of sequences", (6, 10, 2, 4, False), (2, 4, 6)),
    ("12 -> 5, rank 3, rsLoRA's scaling", (12, 5, 3, 6, True), (4, 12)),
]


def _factors(layer):
    return {
        "W": layer.base_layer.weight.detach().clone(),
        "A": layer.lora_A.weight.detach().clone(),
        "B": layer.lora_B.weight.detach().clone(),
        "scaling": layer.scaling,
    }


def lora_functions(forward, merge, unmerge):
    """Exercise 4: the layer's forward pass, merge and unmerge as functions of its tensors.

    Each is run on the cases of ``_LAYERS`` (rank 1, a non-square layer with 3-D input, rsLoRA)
    and compared with lora_lab.LoRALinear: its output, its weight after ``merge()``, and the
    weight ``unmerge()`` gives back from the merged one.
    """
    forward_cases, merge_cases, unmerge_cases = [], [], []
    for i, (label, (fin, fout, rank, alpha, rs), shape) in enumerate(_LAYERS):
        layer = _reference(fin, fout, rank, alpha, use_rslora=rs, seed=i)
        f = _factors(layer)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + i))
        with torch.no_grad():
            h = layer(x)
            layer.merge()
            merged = layer.base_layer.weight.detach().clone()
            layer.unmerge()
        b = layer.base_layer.bias.detach().clone()
        forward_cases.append((label, {"x": x, "W": f["W"], "b": b, "A": f["A"], "B": f["B"],
                                      "scaling": f["scaling"]}, h))  # fmt: skip
        merge_cases.append((label, {"W": f["W"], "A": f["A"], "B": f["B"],
                                    "scaling": f["scaling"]}, merged))  # fmt: skip
        unmerge_cases.append((f"{label}, after merge", {"W_merged": merged, "A": f["A"],
                              "B": f["B"], "scaling": f["scaling"]}, f["W"]))  # fmt: skip
    parts = [
        (forward, forward_cases, "lora_forward",
         "h = x W^T + b + scaling * (x A^T) B^T: x goes down to r numbers through A, back up "
         "through B."),
        (merge, merge_cases, "merge", "merging adds scaling * B @ A, an (out, in) matrix, to W."),
        (unmerge, unmerge_cases, "unmerge",
         "unmerging subtracts the same scaling * B @ A, which brings W back up to rounding."),
    ]  # fmt: skip
    for fn, cases, what, why in parts:
        result = check_function(fn, cases, what=what, why=why, atol=1e-5)
        if not result.correct:
            return result
    return Result(True, f"lora_forward, merge and unmerge pass all {3 * len(_LAYERS)} cases, "
                        "rank 1, a non-square layer and rsLoRA's scaling included.")  # fmt: skip


def layer_class(cls):
    """A LoRA layer class built like chapter 3's, judged against lora_lab.LoRALinear.

    ``cls(base, rank=, alpha=, dropout=, use_rslora=)`` must expose ``lora_A``, ``lora_B`` (as
    nn.Linear), ``scaling``, ``merge()`` and ``unmerge()``. On each case of ``_LAYERS``, with
    dropout 0.1: its outputs in eval mode and in train mode (same seed, so the same mask), the
    gradients of A and B, the weight after merge(), its output while merged, the weight after
    unmerge(), and the scaling must match lora_lab's layer.
    """
    if not isinstance(cls, type):
        return Result(False, f"a layer class was expected, got {type(cls).__name__} {cls!r}.")

    def stage(in_features, out_features, rank, alpha, use_rslora, x, what, seed):
        ref = _reference(in_features, out_features, rank, alpha, use_rslora, 0.1, seed)
        layer = cls(copy.deepcopy(ref.base_layer), rank=rank, alpha=alpha, dropout=0.1,
                    use_rslora=use_rslora)  # fmt: skip
        with torch.no_grad():
            layer.lora_A.weight.copy_(ref.lora_A.weight)
            layer.lora_B.weight.copy_(ref.lora_B.weight)
        return _run_stage(layer, x, what)

    cases = []
    for i, (label, (fin, fout, rank, alpha, rs), shape) in enumerate(_LAYERS):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + i))
        for what in _STAGES:
            kwargs = {"in_features": fin, "out_features": fout, "rank": rank, "alpha": alpha,
                      "use_rslora": rs, "x": x, "what": what, "seed": i}  # fmt: skip
            ref = _reference(fin, fout, rank, alpha, rs, 0.1, i)
            cases.append((f"{label}: {what}", kwargs, _run_stage(ref, x, what)))
    return check_function(
        stage,
        cases,
        what="the layer class",
        why="it computes what lora_lab.LoRALinear (tested against PEFT) computes.",
        atol=1e-6,
    )


_STAGES = ("scaling", "eval output", "train output (same dropout mask)", "gradients of A and B",
           "weight after merge()", "output while merged", "weight after unmerge()")  # fmt: skip


def _run_stage(layer, x, what):
    """One observable of ``layer`` on input ``x``: what ``layer_class`` compares."""
    if what == "scaling":
        return float(layer.scaling)
    if what == "eval output":
        with torch.no_grad():
            return layer.eval()(x)
    if what == "train output (same dropout mask)":
        torch.manual_seed(1)
        with torch.no_grad():
            return layer.train()(x)
    if what == "gradients of A and B":
        layer.eval()(x).square().sum().backward()
        return (layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    W = layer.base_layer.weight.detach().clone()
    layer.eval().merge()
    if what == "weight after merge()":
        return layer.base_layer.weight.detach().clone()
    if what == "output while merged":
        with torch.no_grad():
            return layer(x)
    layer.unmerge()
    return layer.base_layer.weight.detach() - W  # zero up to rounding


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
