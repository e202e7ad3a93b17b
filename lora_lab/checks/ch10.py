"""Checkers for chapter 10, "Visualizing updates"."""

import math

import torch

from lora_lab.checks import Result, check_function, check_number, named_slip, unanswered


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def chance_overlap(answer, model="llama-2-7b", module="down_proj", i=8, j=64):
    """Exercise 1: phi(i, j) expected between random subspaces of ``module``'s input space."""
    from lora_lab.specs import PRESETS

    if model not in PRESETS:
        raise ValueError(f"model must be one of {sorted(PRESETS)}, got {model!r}")
    spec = PRESETS[model]
    inputs = {
        "q_proj": spec.hidden_size,
        "up_proj": spec.hidden_size,
        "gate_proj": spec.hidden_size,
        "down_proj": spec.intermediate_size,
    }
    if module not in inputs:
        raise ValueError(f"module must be one of {sorted(inputs)}, got {module!r}")
    d = inputs[module]
    expected = max(i, j) / d
    if answer is None:
        return unanswered(
            "a random j-dimensional subspace of R^d catches j/d of any unit "
            "vector's squared length on average; sum over the i vectors, then "
            "divide by min(i, j)."
        )
    other = spec.intermediate_size if d == spec.hidden_size else spec.hidden_size
    slip = named_slip(
        answer,
        expected,
        [
            (i * j / d, "that is E||U_i^T V_j||_F^2 itself; phi divides it by min(i, j)."),
            (
                min(i, j) / d,
                "the smaller dimension cancels against min(i, j), the larger one stays.",
            ),
            (
                max(i, j) / other,
                f"the right-singular vectors of A live in the layer's input space, "
                f"which for {module} has {d:,} dimensions, not {other:,}.",
            ),
        ],
    )
    if slip is not None:  # a Result is falsy when wrong, so test for None
        return slip
    return check_number(
        answer,
        expected,
        what=f"chance-level phi({i}, {j}) for {model}'s {module}",
        rel_tol=1e-4,
        why=f"i*j/d over min(i, j) is max(i, j)/d = {max(i, j)}/{d:,}: at this width, any overlap "
        "well above it is shared structure, not luck.",
    )


def init_bound(answer, in_features=None, hidden_size=None):
    """Exercise 2: the largest |entry| of a freshly initialised lora_A on an input of that width.

    ``in_features`` (the MLP's width, down_proj's input) and ``hidden_size`` (the model's width,
    for the slip of using it instead) default to the shipped model's.
    """
    from lora_lab.model import GPTConfig

    if in_features is None:
        in_features = GPTConfig().intermediate_size  # down_proj's input: the MLP's width
    if hidden_size is None:
        hidden_size = GPTConfig().n_embd
    for name, value in (("in_features", in_features), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    expected = 1 / math.sqrt(in_features)
    if answer is None:
        return unanswered(
            "kaiming_uniform_ with a=sqrt(5) draws from U(-b, b) with "
            "b = gain * sqrt(3 / fan_in) and gain = sqrt(2 / (1 + a^2)); "
            "lora_A's fan_in is its number of columns."
        )
    slip = named_slip(
        answer,
        expected,
        [
            (
                1 / math.sqrt(hidden_size),
                f"that is the bound for an input of the model's width "
                f"(hidden size, n_embd) = {hidden_size}; this lora_A reads "
                f"{in_features} features.",
            ),
            (
                math.sqrt(6 / in_features),
                "that is He's bound (a = 0); nn.Linear and PEFT use "
                "a = sqrt(5), which gives a gain of sqrt(1/3).",
            ),
            (
                1 / math.sqrt(3 * in_features),
                "that is the standard deviation b/sqrt(3); the question asks for the bound b.",
            ),
        ],
    )
    if slip is not None:  # a Result is falsy when wrong, so test for None
        return slip
    return check_number(
        answer,
        expected,
        what=f"the bound of lora_A's init for {in_features} inputs",
        rel_tol=1e-4,
        why=f"b = sqrt(1/3) * sqrt(3/{in_features}) = 1/sqrt({in_features}): the histogram's "
        "flat init box ends there.",
    )


def energy_rank(answer, layer, share=0.9):
    """Exercise 3: the fewest singular directions of ``layer``'s update holding ``share`` of it."""
    from lora_lab.lora import LoRALinear

    if not isinstance(layer, LoRALinear):
        raise TypeError(f"layer must be a lora_lab LoRALinear, got {type(layer).__name__}")
    if not _is_number(share) or not 0 < share <= 1:
        raise ValueError(f"share must be a number in (0, 1], got {share!r}")
    if answer is None:
        return unanswered(
            "take torch.linalg.svdvals of the layer's delta_weight(), square, "
            "and find where the running share of the total first reaches it."
        )
    with torch.no_grad():
        S = torch.linalg.svdvals(layer.delta_weight().detach().cpu().double())
    power = S.square()
    if power.sum() == 0:
        raise ValueError("layer's update is zero (lora_B is still 0): train it first")
    running = power.cumsum(0) / power.sum()
    expected = int((running < share - 1e-12).sum()) + 1
    if isinstance(answer, bool) or not isinstance(answer, int):
        return Result(
            False,
            f"the number of directions should be an int, got {type(answer).__name__} {answer!r}.",
        )
    if answer == expected:
        return Result(
            True,
            f"the top {expected} of its {layer.rank} possible directions hold "
            f"{running[expected - 1]:.1%} of the update's squared norm.",
        )
    if answer == layer.rank and expected < layer.rank:
        return Result(
            False,
            f"{layer.rank} is the adapter's rank, an upper bound; the energy "
            f"is concentrated in fewer directions.",
        )
    if 1 <= answer <= running.numel():
        side = "hold only" if answer < expected else "are more than needed to reach"
        return Result(
            False,
            f"the top {answer} directions {side} {share:.0%} "
            f"(they hold {running[answer - 1]:.1%}).",
        )
    return Result(False, f"{answer} is not a number of directions between 1 and {running.numel()}.")


def _amplification_cases():
    """(label, kwargs, expected) for the amplification-factor exercise; expected by hand or, for
    the random case, by lora_lab.updates (whose hand-checked tests are tests/test_updates.py)."""
    from lora_lab.updates import amplification_factor

    def unit(i, d=6):
        e = torch.zeros(d, 1, dtype=torch.float64)
        e[i] = 1.0
        return e

    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    skew = W.clone()
    skew[0, 2] = 0.5  # W also acts from input 2 into output 0
    gen = torch.Generator().manual_seed(0)
    W_rect = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    delta_rect = torch.randn(5, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 8, generator=gen, dtype=torch.float64
    )
    return [
        (
            "an update along W's strongest direction",
            {"W": W, "delta": 2 * unit(0) @ unit(0).T, "r": 1},
            0.4,
        ),
        (
            "an update along W's weakest direction",
            {"W": W, "delta": 3 * unit(5) @ unit(5).T, "r": 1},
            6.0,
        ),
        (
            "a rank-2 update, r = 1 keeps its top direction only",
            {"W": W, "delta": 3 * unit(1) @ unit(1).T + unit(4) @ unit(4).T, "r": 1},
            math.sqrt(10) / 4,
        ),
        (
            "an update from input 2 into output 0",
            {"W": skew, "delta": 2 * unit(0) @ unit(2).T, "r": 1},
            4.0,
        ),
        (
            "a random rank-3 update of a 5 x 8 weight",
            {"W": W_rect, "delta": delta_rect, "r": 3},
            amplification_factor(W_rect, delta_rect, 3),
        ),
    ]


def amplification_factor(fn):
    """Exercise 4: the learner's ``fn(W, delta, r)``, the amplification factor of section 6,
    run on cases whose answers are known; the first wrong case is reported."""
    return check_function(
        fn,
        _amplification_cases(),
        what="amplification_factor(W, delta, r)",
        why="||delta||_F / ||U^T W V||_F compares the update with what W already does along the "
        "update's own top r singular directions: large when the update pushes where W is weak.",
        atol=1e-6,
    )
