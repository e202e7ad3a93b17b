"""Chapter 11's measurements of LoRA's variants: the precomputed runs, and the quantization errors.

``variants_plan`` says what ``scripts/ch11_variants.py`` trains: every variant (LoRA, rsLoRA,
DoRA, PiSSA, LoRA+) on chapter 8's far task at rank 8 on all linear layers, over a grid of
learning rates and three seeds, and LoRA+ at several ratios. The chapter reads the committed
file with ``read_variants`` and summarises it with ``method_scores``, ``steps_to_target`` and
``loraplus_sweep``. ``frozen_errors`` computes, on a model's weights, what each start leaves
to the 4-bit (or 3- or 2-bit) frozen weight: the error QLoRA, PiSSA and LoftQ begin with.
"""

import math
from pathlib import Path

from .experiments import _record, choose_lr, finetune, lr_ladder, seed_stats
from .validate import finite_number, int_at_least, module

VARIANTS_FILE = Path(__file__).resolve().parent / "results" / "ch11_variants.json"
RANK, ALPHA = 8, 16  # every variant at chapter 8's rank and alpha, on all linear layers
LORAPLUS_RATIO = 16  # the LoRA+ paper's suggested ratio, and PEFT's example
TASK, STEPS = "reverse3", 150  # chapter 8's far task, where rank 8 leaves room to improve
WINDOW = 10  # steps averaged when reading a loss curve (one batch's loss is noisy)


def variants_plan(base, quick=False):
    """Tasks, seeds, methods (apply_lora arguments plus LoRA+'s ratio) and learning-rate grids.

    Each grid has five rungs of the 1-2-5 ladder, placed where that method's best rate lies on
    the shipped model (the chapter asserts every chosen rate has a worse one on each side):
    LoRA and DoRA around chapter 8's; rsLoRA, PiSSA and LoRA+ lower, since their updates start
    larger (rsLoRA's scaling is sqrt(r) = 2.8 times alpha/r; PiSSA starts from W's largest
    directions; LoRA+ moves B 16 times faster). LoRA also runs at sqrt(r) times rsLoRA's rates
    (part "equivalent"). ``quick``: a toy size for tests.
    """
    from .hub import train_settings

    module("base", base)
    center = train_settings(base).lr_lora
    lora = {"rank": RANK, "alpha": ALPHA, "target_modules": "all-linear"}
    methods = {
        "LoRA": dict(lora),
        "rsLoRA": {**lora, "use_rslora": True},
        "DoRA": {**lora, "use_dora": True},
        "PiSSA": {**lora, "init_lora_weights": "pissa"},
        "LoRA+": {**lora, "loraplus_lr_ratio": LORAPLUS_RATIO},
    }
    grids = {
        "LoRA": lr_ladder(center, 2, 2),
        "DoRA": lr_ladder(center, 2, 2),
        "rsLoRA": lr_ladder(center, 3, 1),
        "PiSSA": lr_ladder(center, 3, 1),
        "LoRA+": lr_ladder(center, 4, 0),
    }
    ratios, ratio_grid = [2, 4, 8, 32], lr_ladder(center, 3, 1)
    seeds, steps = [0, 1, 2], STEPS
    if quick:
        seeds, steps, ratios = [0], 3, [4]
        grids = {m: g[1:3] for m, g in grids.items()}
        ratio_grid = ratio_grid[1:3]
        # (the equivalent rates follow rsLoRA's shortened grid)
    return {
        "task": TASK,
        "steps": steps,
        "batch_size": train_settings(base).batch_size,
        "seeds": seeds,
        "methods": methods,
        "lr_grid": grids,
        "ratios": ratios,  # LoRA+ ratios besides 1 (LoRA) and LORAPLUS_RATIO (the method)
        "ratio_lr_grid": ratio_grid,
        # LoRA at sqrt(r) times each rsLoRA rate: under AdamW, rsLoRA's larger scaling acts
        # like a larger learning rate, and these runs test by how much
        "equivalent_lrs": [lr * math.sqrt(RANK) for lr in grids["rsLoRA"]],
    }


def _train(base, tokenizer, plan, part, method, lr, seed, config):
    lora = {k: v for k, v in config.items() if k != "loraplus_lr_ratio"}
    ratio = config.get("loraplus_lr_ratio")
    settings = {"lora": lora, "batch_size": plan["batch_size"], "seed": seed}
    try:
        run = finetune(base, plan["task"], plan["steps"], lr, tokenizer=tokenizer,
                       loraplus_lr_ratio=ratio, **settings)  # fmt: skip
    except FloatingPointError:  # diverged: the worst result at this rate
        return {"part": part, "method": method, "ratio": ratio, "lr": lr, "seed": seed,
                "diverged": True, "train_loss": None}  # fmt: skip
    row = _record(run, part, method, plan["task"], plan["steps"])
    return {**row, "ratio": ratio}


def run_variants(base, tokenizer, plan, log=None):
    """Train everything ``plan`` asks for, in sequence; return the raw results (JSON-ready)."""
    log = log or (lambda line: None)
    runs = []
    for method, config in plan["methods"].items():
        for lr in plan["lr_grid"][method]:
            for seed in plan["seeds"]:
                runs.append(_train(base, tokenizer, plan, "methods", method, lr, seed, config))
                log(_line(runs[-1]))
    lora = plan["methods"]["LoRA"]
    for lr in plan["equivalent_lrs"]:
        for seed in plan["seeds"]:
            runs.append(_train(base, tokenizer, plan, "equivalent", "LoRA", lr, seed, lora))
            log(_line(runs[-1]))
    for ratio in plan["ratios"]:
        for lr in plan["ratio_lr_grid"]:
            for seed in plan["seeds"]:
                config = {**lora, "loraplus_lr_ratio": ratio}
                runs.append(_train(base, tokenizer, plan, "ratios", "LoRA+", lr, seed, config))
                log(_line(runs[-1]))
    return {"plan": plan, "runs": runs, "model_params": sum(p.numel() for p in base.parameters())}


def _line(r):
    if r["diverged"]:
        return f"{r['method']:7s} ratio {r['ratio']} lr {r['lr']:.0e} seed {r['seed']}: diverged"
    return (
        f"{r['method']:7s} ratio {r['ratio']} lr {r['lr']:.0e} seed {r['seed']}: loss "
        f"{r['train_loss']:.3f}, test exact {100 * r['test']['exact']:.1f}"
    )


def read_variants(path=None):
    """The committed results of ``scripts/ch11_variants.py`` (None if the file does not exist)."""
    from .files import read_json_result

    path = VARIANTS_FILE if path is None else Path(path)
    results = read_json_result(path)
    if results is not None and not {"plan", "runs"} <= set(results):
        raise ValueError(f"{path}: expected the keys 'plan' and 'runs', got {sorted(results)}")
    return results


# ----------------------------------------------------------------------------- reading the runs


def _runs(results, method, ratio=None):
    """The runs of ``method`` (the LoRA+ ratio sweep too, at ``ratio``)."""
    return [
        r
        for r in results["runs"]
        if r["method"] == method
        and (ratio is None or r["ratio"] == ratio)
        and (ratio is not None or r["part"] == "methods")
    ]


def _chosen(runs):
    """(lr, bracketed, the runs at that lr): the rate with the lowest mean final training loss."""
    losses = {}
    for r in runs:
        losses.setdefault(r["lr"], []).append(r["train_loss"])
    lr, bracketed = choose_lr(losses)
    return lr, bracketed, [r for r in runs if r["lr"] == lr]


def method_scores(results):
    """``{method: {...}}``: each method at its chosen rate: exact match and loss over seeds."""
    out = {}
    for method in results["plan"]["methods"]:
        lr, bracketed, runs = _chosen(_runs(results, method))
        out[method] = {
            "lr": lr,
            "bracketed": bracketed,
            "exact_each": [100 * r["test"]["exact"] for r in runs],  # per seed
            "exact": seed_stats([100 * r["test"]["exact"] for r in runs]),
            "char_acc": seed_stats([100 * r["test"]["char_acc"] for r in runs]),
            "train_loss": seed_stats([r["train_loss"] for r in runs]),
            "trainable": runs[0]["trainable"],
            "state_bytes": runs[0]["state_bytes"],
            "curves": [r["loss_curve"] for r in runs],
        }
    return out


def committed_run(results, method, lr, seed, ratio=None):
    """The committed run of ``method`` at ``lr`` with ``seed`` (LoRA+ at ``ratio`` if given;
    else the method's own runs, part "methods")."""
    runs = [r for r in _runs(results, method, ratio) if r["lr"] == lr and r["seed"] == seed]
    if not runs:
        raise ValueError(f"no committed run of {method!r} (ratio {ratio}) at lr {lr} seed {seed}")
    return runs[0]


def chapter8_pairs(results, ch08):
    """``[(run here, chapter 8's run)]``: plain LoRA here beside chapter 8's "LoRA all-linear"
    on the same task at the same rate and seed (``ch08``: ``experiments.read_compare()``)."""
    theirs = {
        (r["lr"], r["seed"]): r
        for r in ch08["runs"]
        if r["method"] == "LoRA all-linear" and r["task"] == results["plan"]["task"]
        and r["part"] == "grid"
    }  # fmt: skip
    return [
        (r, theirs[r["lr"], r["seed"]])
        for r in _runs(results, "LoRA")
        if (r["lr"], r["seed"]) in theirs
    ]


def smooth(curve, window=WINDOW):
    """The running mean of the last ``window`` losses at each step (fewer at the start)."""
    if not isinstance(curve, (list, tuple)) or not curve:
        raise ValueError(f"curve must be a non-empty list of losses, got {curve!r}")
    int_at_least("window", window)
    out, total = [], 0.0
    for i, value in enumerate(curve):
        total += value - (curve[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def steps_to_target(curve, target, window=WINDOW):
    """The first step (counted from 1) whose smoothed loss is at most ``target``; None if none."""
    finite_number("target", target)
    for step, value in enumerate(smooth(curve, window), start=1):
        if value <= target:
            return step
    return None


def mean_steps_to_target(curves, target, limit):
    """Per curve, the steps to ``target`` (``limit`` + 1 when never reached), and their mean."""
    steps = [steps_to_target(c, target) or limit + 1 for c in curves]
    return steps, sum(steps) / len(steps)


def target_loss(results):
    """The loss LoRA ends at: its smoothed final loss at its chosen rate, mean over seeds."""
    runs = _chosen(_runs(results, "LoRA"))[2]
    return sum(smooth(r["loss_curve"])[-1] for r in runs) / len(runs)


def loraplus_sweep(results):
    """``{ratio: {...}}``: LoRA+ at each ratio (1 is LoRA), its chosen rate and steps to target.

    Steps to target count, per seed, the steps until the smoothed loss reaches ``target_loss``
    (LoRA's final loss); a seed that never reaches it counts as the whole run plus one.
    """
    plan, target = results["plan"], target_loss(results)
    sets = {1: _runs(results, "LoRA"), LORAPLUS_RATIO: _runs(results, "LoRA+")}
    sets.update({ratio: _runs(results, "LoRA+", ratio) for ratio in plan["ratios"]})
    out = {}
    for ratio in sorted(sets):
        lr, bracketed, runs = _chosen(sets[ratio])
        curves = [r["loss_curve"] for r in runs]
        steps, mean = mean_steps_to_target(curves, target, plan["steps"])
        out[ratio] = {
            "lr": lr,
            "bracketed": bracketed,
            "steps": steps,
            "steps_mean": mean,
            "curves": curves,
            "exact": seed_stats([100 * r["test"]["exact"] for r in runs]),
            "train_loss": seed_stats([r["train_loss"] for r in runs]),
        }
    return out


def rslora_equivalence(results):
    """``{rsLoRA's rate: {...}}``: rsLoRA at each rate beside LoRA at sqrt(r) times it.

    Mean final training loss and test exact match over seeds, for both; a diverged run makes
    its side's loss None.
    """
    plan = results["plan"]
    factor = math.sqrt(plan["methods"]["rsLoRA"]["rank"])
    out = {}
    for lr in plan["lr_grid"]["rsLoRA"]:
        sides = {
            "rsLoRA": [r for r in _runs(results, "rsLoRA") if r["lr"] == lr],
            "LoRA at sqrt(r) x lr": [
                r
                for r in results["runs"]
                if r["part"] == "equivalent" and math.isclose(r["lr"], lr * factor)
            ],
        }
        row = {}
        for side, runs in sides.items():
            done = [r for r in runs if not r["diverged"]]
            full = runs and len(done) == len(runs)
            row[f"{side}: loss"] = sum(r["train_loss"] for r in done) / len(done) if full else None
            row[f"{side}: exact %"] = (
                sum(100 * r["test"]["exact"] for r in done) / len(done) if full else None
            )
        out[lr] = row
    return out


# ----------------------------------------------------------------------------- quantization


FROZEN_METHODS = ("QLoRA", "PiSSA", "LoftQ, 1 step", "LoftQ, 5 steps")


def _layer_errors(weight, bits, rank, scaling):
    """{method: ||W - (frozen + update)||_F^2} for one weight (out, in) at ``bits`` bits."""
    from .quant import nf_roundtrip
    from .variants import loftq_steps, pissa_factors

    w = weight.detach().float()
    A, B, residual = pissa_factors(w, rank, scaling)  # residual + s B A = W exactly
    errors = {
        "QLoRA": (w - nf_roundtrip(w, bits)).square().sum().item(),
        "PiSSA": (residual - nf_roundtrip(residual, bits)).square().sum().item(),
    }
    for step, (A, B, Q) in enumerate(loftq_steps(w, rank, bits), start=1):
        if step in (1, 5):  # LoftQ's start Q + B A (the paper's; PEFT's when scaling is 1)
            errors[f"LoftQ, {step} step" + ("s" if step > 1 else "")] = (
                (w - Q - B @ A).square().sum().item()
            )
        if step == 5:
            return errors


def frozen_errors(model, bits=(4, 3, 2), rank=RANK, alpha=ALPHA, targets="all-linear"):
    """``{(method, bits): error}``: how far each start is from the model's weights, all layers.

    The error is ||W - (frozen + update)||_F / ||W||_F over every targeted layer together:
    QLoRA quantizes W; PiSSA quantizes the residual W - s B A and keeps its exact top-r part
    in the adapter; LoftQ alternates (1 and 5 steps). NF at 4 bits is the course's NF4.
    """
    from .lora import find_target_modules, is_conv1d

    module("model", model)
    names = find_target_modules(model, targets)
    totals, norm = {}, 0.0
    for name in names:
        layer = model.get_submodule(name)
        weight = layer.weight.T if is_conv1d(layer) else layer.weight  # (out, in)
        norm += weight.float().square().sum().item()
        for b in bits:
            for method, err in _layer_errors(weight, b, rank, alpha / rank).items():
                totals[method, b] = totals.get((method, b), 0.0) + err
    return {key: math.sqrt(value / norm) for key, value in totals.items()}
