"""Checkers for chapter 9, "Hyperparameters"."""

import math

from lora_lab.checks import Result, check_number, unanswered

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _int(answer):
    return isinstance(answer, int) and not isinstance(answer, bool)


def rank_for_budget(answer, budget=32_768, targets="all-linear", model=None):
    """Exercise 1: the largest rank whose LoRA on ``targets`` of ``model`` fits ``budget``.

    ``model`` is the chapter's model (any model ``ModelSpec.from_model`` reads); None means
    the shipped one.
    """
    from lora_lab.lora import apply_lora, count_parameters

    if model is None:
        from lora_lab.model import CHECKPOINT_DIR, GPT, read_config

        shipped = GPT(read_config(CHECKPOINT_DIR / "config.json"))  # the shipped shapes
        per_rank = count_parameters(apply_lora(shipped, rank=1, target_modules=targets))[0]
    else:
        from lora_lab.specs import ModelSpec

        per_rank = ModelSpec.from_model(model).lora_parameters(1, targets)
    expected = budget // per_rank  # counts are linear in the rank
    why = (
        f"each unit of rank adds {per_rank:,} parameters with {targets!r}, so rank "
        f"{expected} gives {expected * per_rank:,} <= {budget:,}."
    )
    if answer is None:
        return unanswered(
            "count the trainable parameters at rank 1 (they grow linearly with "
            "the rank) and divide the budget by it, rounding down."
        )
    if not _int(answer):
        return Result(False, f"a rank is a whole number, got {type(answer).__name__} {answer!r}.")
    if answer == expected:
        return Result(True, why)
    if answer == expected + 1:
        return Result(
            False,
            f"rank {answer} gives {answer * per_rank:,}, over the budget of "
            f"{budget:,}; round down.",
        )
    return Result(False, f"rank {answer} gives {answer * per_rank:,} parameters. {why}")


def rslora_ratio(answer, rank=64):
    """Exercise 2: rsLoRA's scaling over the standard one, at the same alpha and ``rank``."""
    why = (
        f"(alpha / sqrt(r)) / (alpha / r) = sqrt(r) = {math.sqrt(rank):g}: alpha cancels, so "
        "the gap grows with the rank."
    )
    if _int(answer) or isinstance(answer, float):
        if answer > 0 and math.isclose(answer, 1 / math.sqrt(rank)):
            return Result(False, "that is the standard scaling over rsLoRA's; turn it round.")
    return check_number(
        answer,
        math.sqrt(rank),
        what="the ratio",
        why=why,
        rel_tol=1e-6,
        hint="write both scalings with the same alpha and divide.",
    )


def llama_qv_params(answer, rank=16):
    """Exercise 3: LoRA parameters on Llama-2-7B's q_proj and v_proj at ``rank``."""
    from lora_lab.specs import PRESETS

    spec = PRESETS["llama-2-7b"]
    expected = spec.lora_parameters(rank=rank, target_modules=["q_proj", "v_proj"])
    d, layers = spec.hidden_size, spec.num_layers
    why = (
        f"2 projections x {layers} blocks x r(d + d) with d = {d}: {expected:,}, about "
        f"{expected / spec.num_parameters():.2%} of the model."
    )
    if _int(answer) and answer * layers == expected:
        return Result(False, f"that is one block; the model has {layers}.")
    return check_number(
        answer,
        expected,
        what="the count",
        why=why,
        rel_tol=0,
        hint="each d x d projection adds r(d_in + d_out) parameters.",
    )
