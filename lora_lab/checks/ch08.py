"""Checkers for chapter 8, "LoRA or full fine-tuning"."""

from lora_lab.checks import Result, check_number, unanswered

ADAM_BYTES = 16  # fp32 weight, gradient and AdamW's two moments, 4 bytes each
WEIGHT_BYTES = 4  # a frozen fp32 weight: no gradient, no optimizer state


def _number(answer):
    return isinstance(answer, (int, float)) and not isinstance(answer, bool)


def _shipped_config():
    from lora_lab.model import CHECKPOINT_DIR, read_config

    return read_config(CHECKPOINT_DIR / "config.json")


def lora_state_bytes(answer, rank=16, targets=("q_proj", "v_proj")):
    """Exercise 1: bytes of weights, gradients and AdamW state for LoRA on the shipped model."""
    from lora_lab.model import GPT

    config = _shipped_config()
    n_total = sum(p.numel() for p in GPT(config).parameters())
    d, layers = config.n_embd, config.n_layer
    n_lora = layers * len(targets) * rank * 2 * d  # each target is d x d: r(d + d)
    expected = WEIGHT_BYTES * n_total + ADAM_BYTES * n_lora
    why = (
        f"{n_total:,} frozen weights at 4 bytes, plus {n_lora:,} LoRA parameters at 16 "
        "(weight, gradient, two AdamW moments)."
    )
    if answer is None:
        return unanswered(
            "every weight costs 4 bytes; only LoRA's parameters also carry a "
            "gradient and two AdamW moments."
        )
    if _number(answer) and answer == ADAM_BYTES * (n_total + n_lora):
        return Result(
            False,
            "that gives every weight a gradient and optimizer state; the "
            "base weights are frozen and carry neither.",
        )
    if _number(answer) and answer == ADAM_BYTES * n_lora:
        return Result(
            False,
            "that is the adapter's share alone; the frozen weights still sit "
            "in memory, 4 bytes each.",
        )
    # AdamW also keeps a 4-byte step counter per trainable tensor: a few hundred bytes
    return check_number(
        answer,
        expected,
        what="the state bytes",
        why=why,
        rel_tol=1e-3,
        hint=f"count the LoRA parameters: {len(targets)} projections of "
        f"{d}x{d} in {layers} blocks, r(d + d) each.",
    )


def speedup_bound(answer, d=4096, rank=16):
    """Exercise 2: training FLOPs per token of a d x d layer, full over LoRA at ``rank``."""
    full = 6 * d * d  # forward 2d^2, backward: input grad 2d^2 + weight grad 2d^2
    lora = 4 * d * d + 12 * d * rank  # frozen W skips its weight grad; A and B: 6 * 2dr
    why = (
        f"full: 6d^2 = {full:,}; LoRA: 4d^2 + 12dr = {lora:,}. The frozen weight still "
        "needs its forward pass and the gradient with respect to its input."
    )
    if answer is None:
        return unanswered(
            "count forward, input-gradient and weight-gradient FLOPs (2 per "
            "multiply-add) for W, then for A and B."
        )
    if _number(answer) and abs(answer - 1.5) < 1e-9:
        return Result(
            False, "1.5 leaves out the work of A and B themselves (12dr FLOPs per token); add it."
        )
    if _number(answer) and abs(answer - 3.0) < 1e-9:
        return Result(
            False,
            "a frozen layer still needs the gradient with respect to its "
            "input, so backpropagation can reach the layers below.",
        )
    return check_number(answer, full / lora, what="the FLOP ratio", why=why, rel_tol=1e-4)


def break_even_rank(answer, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Exercise 3: rank at which LoRA's state bytes equal full fine-tuning's, shipped model."""
    from lora_lab.model import GPT

    config = _shipped_config()
    n_total = sum(p.numel() for p in GPT(config).parameters())
    d, layers = config.n_embd, config.n_layer
    per_rank = layers * len(targets) * 2 * d  # LoRA parameters added per unit of rank
    # 4 N + 16 r per_rank = 16 N  (the adapter's own weights: 4 bytes in the 16)
    expected = (ADAM_BYTES - WEIGHT_BYTES) * n_total / (ADAM_BYTES * per_rank)
    why = (
        f"4N + 16 r * {per_rank:,} = 16N with N = {n_total:,} gives r = {expected:.1f}, "
        f"above the largest rank a {d}x{d} layer allows ({d}): LoRA on these layers never "
        "costs what full fine-tuning costs."
    )
    if answer is None:
        return unanswered("solve 4N + 16 * r * (LoRA parameters per unit of rank) = 16N for r.")
    if (
        _number(answer)
        and answer > 0
        and abs(answer - ADAM_BYTES * n_total / (ADAM_BYTES * per_rank)) < 1e-6 * answer
    ):
        return Result(
            False, "that forgets that the frozen weights stay in memory (4N on LoRA's side too)."
        )
    return check_number(
        answer,
        expected,
        what="the break-even rank",
        why=why,
        rel_tol=1e-3,
        hint=f"LoRA adds {per_rank:,} parameters per unit of rank here.",
    )
