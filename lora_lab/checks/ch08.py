"""Checkers for chapter 8, "LoRA or full fine-tuning"."""

from lora_lab.checks import Result, check_function, check_number, unanswered

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


def score_resolution(answer, task="butler", seeds=3):
    """Exercise 2: the smallest non-zero gap, in points, between two methods' exact-match
    scores on ``task``'s test split, each the mean of ``seeds`` seeds."""
    from lora_lab.data import get_task

    n = len(get_task(task).test)
    expected = 100 / (n * seeds)  # one question of one seed moves a mean by this much
    why = (
        f"one question is 100/{n} = {100 / n:.3g} points of one run, and a mean over {seeds} "
        f"seeds moves in steps of a third of that: {expected:.3g} points. A gap of 2 points is "
        "about two questions' worth of seeds: read the verdicts with that grain in mind."
    )
    if answer is None:
        return unanswered(
            f"the test split has {n} questions; a mean of {seeds} seeds counts {n * seeds} answers."
        )
    if _number(answer) and abs(answer - 100 / n) < 1e-6 * 100 / n:
        return Result(
            False,
            f"that is one question of a single run; the mean over {seeds} seeds counts "
            f"{n * seeds} answers, so it moves in finer steps.",
        )
    if _number(answer) and abs(answer - expected / 100) < 1e-6 * expected / 100:
        return Result(False, "that is a fraction; the verdicts count in points (100 x).")
    return check_number(answer, expected, what="the smallest gap", why=why, rel_tol=1e-3)


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


# ---------------------------------------------------------------- exercise 4: code

_LR_HINTS = {
    "a lucky seed": "average each rate's seeds before comparing: one lucky seed is not a better rate.",
    "rates not in order": "bracketed means neither the smallest nor the largest rate by value; "
    "a dict keeps the order rates were added in, which need not be sorted.",
    "a diverged run": "a run that diverged (None) makes its rate the worst, whatever its other "
    "seeds did.",
    "the best at the largest rate": "a best rate at the end of the grid is not bracketed: a "
    "larger one might be better still.",
}


def _lr_cases():
    """(label, kwargs, expected) for choose_lr; expected from lora_lab.experiments.choose_lr."""
    from lora_lab.experiments import _losses, _runs, choose_lr, read_compare

    grids = [
        ("three rates, one seed each", {1e-3: [0.5], 2e-3: [0.3], 5e-3: [0.4]}),
        ("the best at the largest rate", {1e-3: [0.5, 0.52], 2e-3: [0.4, 0.41], 5e-3: [0.3, 0.33]}),
        ("a lucky seed", {5e-4: [0.5, 0.52, 0.5], 1e-3: [0.30, 0.31, 0.29],
                          2e-3: [0.05, 0.60, 0.58], 5e-3: [0.4, 0.41, 0.39]}),
        ("rates not in order", {2e-3: [0.2, 0.21], 1e-3: [0.4, 0.42], 5e-3: [0.3, 0.29]}),
        ("a diverged run", {1e-3: [0.3, 0.3], 2e-3: [0.2, None], 5e-3: [0.25, 0.26]}),
    ]  # fmt: skip
    results = read_compare()
    if results is not None:  # the chapter's own grid: full fine-tuning on the far task
        far = next(t for t, s in results["plan"]["tasks"].items() if s["role"] == "far")
        grids.append(
            ("chapter 8's far task, full fine-tuning", _losses(_runs(results, "grid", far, "full")))
        )
    return [(label, {"losses": g}, choose_lr(g)) for label, g in grids]


def choose_lr(fn):
    """Exercise 4: the learner's choose_lr(losses) -> (best rate, bracketed), run on grids."""
    why = (
        "A fair comparison gives each method the rate with its lowest mean training loss, and "
        "trusts it only when a smaller and a larger rate were tried and did worse."
    )
    if fn is None or not callable(fn):
        return check_function(fn, [], what="your choose_lr", why=why)
    verdict = check_function(fn, _lr_cases(), what="your choose_lr", why=why, atol=1e-12)
    hint = next((h for label, h in _LR_HINTS.items() if f"({label};" in verdict.message), "")
    if verdict.correct or not hint or "): raised " in verdict.message:
        return verdict
    return Result(False, f"{verdict.message} Hint: {hint}")
