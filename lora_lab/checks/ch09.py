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


# ----------------------------------------------------------------------------- exercise 4


def reference_lora(model):
    """The chapter's reference adapter for ``model``: rank 8, alpha 16, its attention layers."""
    from lora_lab.specs import ModelSpec

    targets = list(ModelSpec.from_model(model).attention_targets())
    return {"rank": 8, "alpha": 16, "target_modules": targets, "use_rslora": False, "dropout": 0.0}


def _committed(grid, task, steps, batch_size, lr, seed, model_name):
    """The committed grid's test loss of the reference at ``lr`` and ``seed``, or None."""
    if not grid or grid.get("model") != model_name or grid.get("quick"):
        return None
    if (grid["task"], grid["steps"], grid["batch_size"]) != (task, steps, batch_size):
        return None
    ref = grid["reference"]
    for run in grid["runs"]:
        same = all(run[k] == ref[k] for k in ("rank", "alpha", "targets", "use_rslora", "dropout"))
        if same and run["seed"] == seed and math.isclose(run["lr"], lr) and not run["diverged"]:
            return run["test_loss"]
    return None


def experiment(fn, base, tokenizer, task, steps, batch_size, *, grid=None, model_name=None,
               cases=((1e-3, 1), (1e-2, 0)), atol=2e-3):  # fmt: skip
    """Exercise 4: ``fn(lr, seed)`` fine-tunes the reference adapter and returns its test loss.

    The checker calls it at each ``(lr, seed)`` of ``cases`` and compares with the same run,
    taken from the committed ``grid`` (lora_lab/results/ch09_grid.json) when it holds it for this model,
    task, steps and batch size, else trained here with ``lora_lab.experiments.finetune``.
    ``atol`` (on the loss, relative and absolute): a run on another device rounds differently;
    another rate, seed or step count, or the training loss instead of the test loss, moves the
    result by more.
    """
    from lora_lab.checks import check_function
    from lora_lab.experiments import finetune

    why = (
        f"each run trains a fresh copy of the model with the reference adapter (rank 8, "
        f"alpha 16, the attention layers) for {steps} steps of {batch_size} examples of "
        f"{task!r}, then scores the test split: the same rate and seed give the same result."
    )
    if fn is None:
        return unanswered(why)
    # the first case runs before any expected value is trained, so a stub costs nothing
    first, done = cases[0], {}
    try:
        done[first] = fn(lr=first[0], seed=first[1])
    except NotImplementedError:
        return unanswered(why)
    except Exception:  # noqa: BLE001 - check_function calls it again and reports the error
        pass

    def once(lr, seed):
        return done.pop((lr, seed)) if (lr, seed) in done else fn(lr=lr, seed=seed)

    lora = reference_lora(base)
    checked = []
    for lr, seed in cases:
        expected = _committed(grid, task, steps, batch_size, lr, seed, model_name)
        if expected is None:
            run = finetune(base, task, steps, lr, lora=lora, batch_size=batch_size, seed=seed,
                           tokenizer=tokenizer)  # fmt: skip
            expected = run.scores["loss"]
        checked.append((f"learning rate {lr:g}, seed {seed}", {"lr": lr, "seed": seed}, expected))
    return check_function(once, checked, what="your experiment's test loss", why=why, atol=atol)
