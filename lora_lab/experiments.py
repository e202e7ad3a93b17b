"""Short fine-tuning experiments: a fresh copy of a base model, adapted, trained and scored.

Chapters 8 and 9 compare many small runs. Each run here starts from the same pretrained
weights, seeds its LoRA initialisation and its batches, and reports what those chapters
tabulate: trainable parameters, bytes, step time, loss and test scores.
"""

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import as_task
from .hub import HALF
from .lora import apply_lora, count_parameters
from .measure import current_rss, release_free_memory, reset_peak_rss
from .training import score, train
from .utils import set_seed
from .validate import finite_number, int_at_least, module_with_parameters

# ---------------------------------------------------------------- one run


@dataclass
class Run:
    """One fine-tuning run: its settings, the trained model, its history and test scores."""

    task: str
    lora: dict | None  # the apply_lora arguments, or None for full fine-tuning
    lr: float
    seed: int
    trainable_params: int
    total_params: int
    scores: dict  # score() on the test split after training
    history: object = field(repr=False)  # the TrainHistory of train()
    model: torch.nn.Module = field(repr=False)
    rss_before: int | None = None  # resident bytes just before training (None: unknown)
    rss_reset: bool = False  # whether the peak RSS was reset before training

    @property
    def method(self):
        return "full" if self.lora is None else f"LoRA r={self.lora.get('rank', 8)}"

    @property
    def median_step_time(self):
        return statistics.median(self.history.step_time)

    def final_train_loss(self, last=10):
        """Mean training loss of the last ``last`` steps (smooths batch-to-batch noise)."""
        int_at_least("last", last)
        tail = self.history.loss[-last:]
        return sum(tail) / len(tail)

    def row(self):
        """A flat dict of the run's numbers, one row of a results table."""
        mem, h = self.history.memory, self.history
        peak = mem.get("peak_rss")
        grew = peak - self.rss_before if self.rss_reset and peak and self.rss_before else None
        return {
            "task": self.task,
            "method": self.method,
            "lr": self.lr,
            "steps": h.steps,
            "batch_size": h.batch_size,
            "seed": self.seed,
            "trainable": self.trainable_params,
            "state_bytes": mem["total"],
            "peak_rss_increase": grew,
            "cuda_peak": mem.get("cuda_max_allocated"),  # None off CUDA
            "median_step_s": self.median_step_time,
            "train_loss": self.final_train_loss(),
            **{f"test_{k}": v for k, v in self.scores.items()},
        }


def finetune(
    base,
    task,
    steps,
    lr,
    *,
    lora=None,
    batch_size=16,
    seed=0,
    tokenizer=None,
    progress=False,
    loraplus_lr_ratio=None,
):
    """Train a copy of ``base`` on ``task`` and score it; ``base`` itself is left untouched.

    ``lora`` is a dict of ``apply_lora`` arguments (e.g. ``{"rank": 8, "alpha": 16}``) for a
    LoRA run, or None to fine-tune every parameter. Full fine-tuning of a 16-bit ``base``
    trains a float32 copy (master weights) with the matmuls in the base's 16-bit type
    (``train``'s ``autocast_dtype``), and scores it the same way; LoRA keeps the 16-bit base
    and float32 adapters. ``loraplus_lr_ratio`` trains a LoRA run with LoRA+ (``train``'s).
    Returns a :class:`Run`.
    """
    module_with_parameters("base", base)
    task = as_task(task)
    if lora is not None and not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict of apply_lora arguments or None, got {lora!r}")
    half = [p.dtype for p in base.parameters() if p.dtype in HALF]
    autocast_dtype = None
    model = copy.deepcopy(base)
    set_seed(seed)  # lora_A's random init
    if lora is None:
        if half:
            autocast_dtype = half[0]  # the base's 16-bit type
            model = model.float()
        model.requires_grad_(True)
    else:
        apply_lora(model, **lora)
    trainable, total = count_parameters(model)
    release_free_memory()
    reset = reset_peak_rss()
    before = current_rss()
    history = train(model, task, steps, lr, batch_size, tokenizer, seed=seed, progress=progress,
                    autocast_dtype=autocast_dtype, loraplus_lr_ratio=loraplus_lr_ratio)  # fmt: skip
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        scores = score(model, task, tokenizer=tokenizer)
    return Run(
        task=task.name,
        lora=None if lora is None else dict(lora),
        lr=lr,
        seed=seed,
        trainable_params=trainable,
        total_params=total,
        scores=scores,
        history=history,
        model=model,
        rss_before=before,
        rss_reset=reset,
    )


# ---------------------------------------------------------------- over seeds and grids


def seed_stats(values):
    """Mean, sample standard deviation, least and largest of per-seed values, and their number.

    A single value has a standard deviation of 0 (nothing to measure a spread with).
    """
    values = list(values) if not isinstance(values, (str, bytes)) else values
    if not isinstance(values, list) or not values:
        raise ValueError(f"values must be a non-empty list of numbers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"values must be finite numbers, got {v!r} in {values!r}")
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def choose_lr(losses):
    """The learning rate with the lowest mean training loss over seeds, and whether it is bracketed.

    ``losses`` maps each learning rate of a grid to the final training losses of its seeds
    (None for a run that diverged: it counts as infinitely bad). Returns ``(lr, bracketed)``:
    bracketed is True when the chosen rate is neither the smallest nor the largest of the grid,
    so a rate on each side was tried and did worse. Only training losses enter: the test split
    plays no part in the choice.
    """
    if not isinstance(losses, dict) or not losses:
        raise ValueError(
            f"losses must be a non-empty dict {{lr: [loss of each seed]}}, got {losses!r}"
        )
    means = {}
    for lr, seeds in losses.items():
        finite_number("a learning rate of losses", lr)
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ValueError(f"losses[{lr!r}] must be a non-empty list of losses, got {seeds!r}")
        if any(s is None for s in seeds):
            means[lr] = math.inf
        else:
            means[lr] = seed_stats(seeds)["mean"]
    best = min(sorted(means), key=means.get)  # ties: the smaller rate
    return best, min(means) < best < max(means)


# ---------------------------------------------------------------- speed: the bound and the timer

_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn")  # read the block's input


def flop_ratio(spec, lora):
    """The least time a LoRA training step can take, as a share of a full fine-tuning step.

    Counts the matrix-product FLOPs per token of the blocks' linear layers and the output layer
    (``spec``: a ModelSpec; ``lora``: apply_lora's arguments, rank and target_modules). Full
    fine-tuning pays 6 per weight: forward, gradient of the input, gradient of the weight. A
    frozen weight skips its weight gradient (4 per weight), and in the first block the layers
    that read the frozen embeddings need no input gradient either (2); each adapter adds its
    own products, ``r * (in + out)`` weights at the same rates. What both methods pay alike
    (attention scores, norms, the optimizer, Python) only brings a measured ratio closer to 1,
    so a measured ratio below this one is a timing error.
    """
    from .specs import ModelSpec

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict of apply_lora arguments, got {lora!r}")
    rank = lora.get("rank", 8)
    targets = {name for name, _, _ in spec.lora_targets(lora.get("target_modules"))}
    full = lora_flops = 0
    for i in range(spec.num_layers):
        for rel, (fin, fout, _) in spec.linear_layers().items():
            name = spec.layer_prefix(i) + rel
            needs_input_grad = i > 0 or not rel.endswith(_ATTENTION_INPUTS)
            full += 6 * fin * fout
            lora_flops += (4 if needs_input_grad else 2) * fin * fout
            if name in targets:
                lora_flops += 2 * rank * (fin + fout) * 3 - (
                    0 if needs_input_grad else 2 * rank * fin
                )
    head = spec.vocab_size * spec.hidden_size
    full += 6 * head
    lora_flops += 4 * head
    return lora_flops / full


def training_step(model, task, lr, batch_size, tokenizer=None, *, seed=0, autocast_dtype=None):
    """A callable that runs one training step of ``model`` on a fixed batch of ``task``.

    The step is ``train``'s: forward, loss on the target tokens, backward, gradient clipping at
    1, AdamW (created here, on the parameters that require grad). It trains ``model`` in place:
    time a copy. Pass the callables of several models to ``lora_lab.measure.interleaved_times``
    so that each sample times them moments apart.
    """
    import torch.nn.functional as F

    from .training import IGNORE, _context_length, _tokenizer, encode_pairs, logits_of, make_batch

    module_with_parameters("model", model)
    task = as_task(task)
    finite_number("lr", lr)
    int_at_least("batch_size", batch_size)
    int_at_least("seed", seed, minimum=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameters with requires_grad=True; nothing to time")
    tokenizer = _tokenizer(model, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(task.train), generator=gen)[:batch_size].tolist()
    examples = encode_pairs([task.train[i] for i in pick], tokenizer, _context_length(model))
    device = next(model.parameters()).device
    x, y = make_batch(examples, device)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    enabled = autocast_dtype is not None

    def step():
        model.train()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def speed_summary(seconds, bounds, *, reference="full", tolerance=0.05):
    """Each method's step time against ``reference``'s, checked against its FLOP bound.

    ``seconds``: ``interleaved_times``' samples {method: [seconds per step, ...]}, the methods
    timed moments apart in each sample; ``bounds``: {method: ``flop_ratio``}. For each other
    method: ``ratio``, the median over samples of its time over the reference's in the same
    sample, and ``middle_half``, the quartiles of those ratios; ``bound``; and ``consistent``,
    False when the ratio is more than ``tolerance``
    below the bound, which no real step can be (then the timing, not LoRA, is at fault).
    """
    if not isinstance(seconds, dict) or reference not in seconds:
        raise ValueError(
            f"seconds must be a dict of timings that includes {reference!r}, got {seconds!r}"
        )
    out = {}
    for method, times in seconds.items():
        if method == reference:
            continue
        if method not in bounds:
            raise ValueError(f"bounds has no FLOP ratio for {method!r}; it has {sorted(bounds)}")
        if len(times) != len(seconds[reference]) or not times:
            raise ValueError(f"{method!r} and {reference!r} must have the same number of samples")
        ratios = [t / r for t, r in zip(times, seconds[reference], strict=True)]
        ratio, bound = statistics.median(ratios), bounds[method]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio,) * 3
        out[method] = {
            "ratio": ratio,
            "middle_half": (q1, q3),  # the quartiles of the ratios: how much the samples spread
            "bound": bound,
            "consistent": ratio >= bound * (1 - tolerance),
            "seconds": statistics.median(times),
            "reference_seconds": statistics.median(seconds[reference]),
        }
    return out


def time_methods(base, tokenizer, methods, task, lrs, batch_size, *, samples, warmup, device=None):
    """Seconds per training step of each method, timed interleaved on copies of ``base``.

    ``methods``: {name: apply_lora arguments, or None for full fine-tuning}; ``lrs``: {name:
    learning rate}. Each method gets a ``training_step`` on a fresh copy (a 16-bit base is
    fully fine-tuned as ``finetune`` does it: float32 weights, 16-bit matmuls), and
    ``lora_lab.measure.interleaved_times`` times them in turn, ``samples`` times after
    ``warmup`` untimed steps. Returns {name: [seconds of each sample]}.
    """
    from .measure import interleaved_times

    module_with_parameters("base", base)
    half = [p.dtype for p in base.parameters() if p.dtype in HALF]
    steps = {}
    for method, lora in methods.items():
        model, autocast_dtype = copy.deepcopy(base), None
        if lora is None:
            if half:
                model, autocast_dtype = model.float(), half[0]
            model.requires_grad_(True)
        else:
            set_seed(0)
            apply_lora(model, **lora)
        steps[method] = training_step(model, task, lrs[method], batch_size, tokenizer,
                                      autocast_dtype=autocast_dtype)  # fmt: skip
    if device is None:
        device = next(base.parameters()).device
    return interleaved_times(steps, samples=samples, warmup=warmup, device=device)


# ---------------------------------------------------------------- chapter 8's comparison

COMPARE_FILE = Path(__file__).resolve().parent / "results" / "ch08_compare.json"
LORA_METHODS = ("LoRA attention", "LoRA all-linear")  # rank 8, alpha 16, on these targets
METHODS = ("full",) + LORA_METHODS
_LADDER = (1, 2, 5)  # learning rates on a 1-2-5 ladder, a factor of 2 to 2.5 apart


def lr_ladder(center, below, above):
    """Learning rates on the 1-2-5 ladder: the rung nearest ``center``, ``below`` rungs under
    it and ``above`` rungs over it (e.g. 3e-4, 2, 2 -> 5e-5, 1e-4, 2e-4, 5e-4, 1e-3)."""
    finite_number("center", center)
    int_at_least("below", below, minimum=0)
    int_at_least("above", above, minimum=0)
    k = round(3 * math.log10(center))  # log10 of 2 and 5 are about 1/3 and 2/3

    def rung(i):
        return float(f"{_LADDER[i % 3]}e{i // 3}")

    return [rung(i) for i in range(k - below, k + above + 1)]


def compare_plan(base, quick=False):
    """What ``run_comparison`` trains: tasks, steps, seeds, methods, learning-rate grids, ranks.

    The grids are placed on the 1-2-5 ladder around ``train_settings(base)``'s rates so that on
    the shipped model each method's best rate lies inside its grid (the results say whether it
    does). ``quick``: the same code path at a toy size (one seed, a few steps), for tests.
    """
    from .hub import train_settings
    from .specs import ModelSpec

    module_with_parameters("base", base)
    settings, spec = train_settings(base), ModelSpec.from_model(base)
    attention = list(spec.attention_targets())
    methods = {
        "full": None,
        "LoRA attention": {"rank": 8, "alpha": 16, "target_modules": attention},
        "LoRA all-linear": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
    }
    # five rungs each, a factor of 2 to 2.5 apart; on the shipped model the optima for these
    # budgets lie inside them (full: about 1e-3; LoRA: 2e-3 to 5e-3), which the results assert.
    # The close task trains for the settings' steps (both methods get near their ceiling); the
    # far task for 150, where full fine-tuning has learnt it (section 5 of chapter 8)
    full_grid, lora_grid = (0, 4), (1, 3)
    if quick:
        steps, seeds, full_grid, lora_grid = {"butler": 2, "reverse3": 3}, [0], (0, 2), (1, 1)
    else:
        steps, seeds = {"butler": settings.steps, "reverse3": 150}, [0, 1, 2]
    return {
        "batch_size": settings.batch_size,
        "seeds": seeds,
        "tasks": {
            "butler": {"role": "close", "steps": steps["butler"], "metric": "exact"},
            "reverse3": {"role": "far", "steps": steps["reverse3"], "metric": "exact"},
        },
        "methods": methods,
        "lr_grid": {
            "full": lr_ladder(settings.lr_full, *full_grid),
            "LoRA attention": lr_ladder(settings.lr_lora, *lora_grid),
            "LoRA all-linear": lr_ladder(settings.lr_lora, *lora_grid),
        },
        "rank_task": "reverse3",
        "ranks": [2, 8] if quick else [2, 8, 32, spec.max_rank(attention)],
        "speed": {"task": "reverse3", "samples": 2 if quick else 30, "warmup": 1 if quick else 3},
    }


def _record(run, part, method, task, steps):
    """One run of the comparison as a JSON-ready dict (the raw numbers the chapter plots)."""
    row = run.row()
    return {
        "part": part,
        "task": task,
        "method": method,
        "rank": None if run.lora is None else run.lora.get("rank", 8),
        "lr": run.lr,
        "seed": run.seed,
        "steps": steps,
        "diverged": False,
        "train_loss": row["train_loss"],
        "loss_curve": [round(v, 5) for v in run.history.loss],
        "test": dict(run.scores),
        "trainable": run.trainable_params,
        "state_bytes": row["state_bytes"],
        "rss_rise": row["peak_rss_increase"],
    }


def _one(base, tokenizer, plan, part, method, task, lr, seed, lora):
    steps = plan["tasks"][task]["steps"]
    try:
        run = finetune(base, task, steps, lr, lora=lora, batch_size=plan["batch_size"],
                       seed=seed, tokenizer=tokenizer)  # fmt: skip
    except FloatingPointError:  # diverged: the worst possible result at this rate
        return {"part": part, "task": task, "method": method, "lr": lr, "seed": seed,
                "steps": steps, "diverged": True, "train_loss": None,
                "rank": None if lora is None else lora.get("rank", 8)}  # fmt: skip
    return _record(run, part, method, task, steps)


def run_comparison(base, tokenizer, plan, log=None):
    """Train everything ``plan`` (``compare_plan``) asks for, in sequence; return the raw results.

    First every method on every task at every rate of its grid and every seed (part "grid");
    then, on the far task, each LoRA method at the other ranks, again at every rate of its
    grid and every seed (part "rank"); then a training step of each method, timed
    interleaved (``speed``). ``log``: a function called with a line per run (e.g. ``print``).
    """
    from .specs import ModelSpec

    log, spec = log or (lambda line: None), ModelSpec.from_model(base)
    runs = []
    for task in plan["tasks"]:
        for method, lora in plan["methods"].items():
            for lr in plan["lr_grid"][method]:
                for seed in plan["seeds"]:
                    runs.append(_one(base, tokenizer, plan, "grid", method, task, lr, seed, lora))
                    log(_line(runs[-1]))
    results = {"plan": plan, "runs": runs}
    task = plan["rank_task"]
    for method in LORA_METHODS:
        for rank in plan["ranks"]:
            if rank == plan["methods"][method]["rank"]:
                continue  # the grid's runs
            lora = {**plan["methods"][method], "rank": rank}
            for lr in plan["lr_grid"][method]:
                for seed in plan["seeds"]:
                    runs.append(_one(base, tokenizer, plan, "rank", method, task, lr, seed, lora))
                    log(_line(runs[-1]))
    timing = plan["speed"]
    lrs = {m: chosen_lrs(results)[timing["task"], m][0] for m in plan["methods"]}
    seconds = time_methods(base, tokenizer, plan["methods"], timing["task"], lrs,
                           plan["batch_size"], samples=timing["samples"], warmup=timing["warmup"])  # fmt: skip
    bounds = {m: flop_ratio(spec, lora) for m, lora in plan["methods"].items() if lora}
    results["speed"] = {**timing, "seconds": seconds, "flop_bound": bounds}
    results["model_params"] = sum(p.numel() for p in base.parameters())
    results["model_bytes"] = sum(p.numel() * p.element_size() for p in base.parameters())
    return results


def _line(r):
    if r["diverged"]:
        return f"{r['part']:>4} {r['task']:>8} {r['method']:>15} lr {r['lr']:<7g} seed {r['seed']} diverged"
    return (f"{r['part']:>4} {r['task']:>8} {r['method']:>15} r {r['rank']} lr {r['lr']:<7g} "
            f"seed {r['seed']}: train loss {r['train_loss']:.4f}, test exact {r['test']['exact']:.3f}")  # fmt: skip


# ---------------------------------------------------------------- reading the comparison


def read_compare(path=None):
    """The results of ``scripts/ch08_compare.py`` at ``path`` (default ``COMPARE_FILE``), or None
    if the file is absent. A file without the parts the chapter reads is an error naming it."""
    from .files import read_json_result

    path = COMPARE_FILE if path is None else Path(path)
    results = read_json_result(path)
    if results is None:
        return None
    missing = [k for k in ("plan", "runs", "speed", "model_params") if k not in results]
    if missing:
        raise ValueError(f"{path}: not a result of scripts/ch08_compare.py (missing {missing})")
    grid = [r for r in results["runs"] if r["part"] == "grid"]
    plan = results["plan"]
    expected = sum(len(plan["lr_grid"][m]) for m in plan["methods"]) * len(plan["seeds"])
    if len(grid) != expected * len(plan["tasks"]):
        raise ValueError(
            f"{path}: {len(grid)} grid runs, the plan asks for {expected * len(plan['tasks'])}"
        )
    return results


def _runs(results, part, task, method, lr=None, rank=None):
    return [
        r for r in results["runs"]
        if r["part"] == part and r["task"] == task and r["method"] == method
        and (lr is None or r["lr"] == lr) and (rank is None or r["rank"] == rank)
    ]  # fmt: skip


def _losses(runs):
    """{lr: [final train loss of each seed]} of ``runs``, for ``choose_lr``."""
    out = {}
    for r in runs:
        out.setdefault(r["lr"], []).append(r["train_loss"])
    return out


def grid_losses(results):
    """{(task, method): {lr: [final training loss of each seed]}} of the grid (None: diverged)."""
    plan = results["plan"]
    return {
        (task, method): _losses(_runs(results, "grid", task, method))
        for task in plan["tasks"]
        for method in plan["methods"]
    }


def chosen_lrs(results):
    """{(task, method): (learning rate, bracketed)} chosen on the grid's mean training loss."""
    return {key: choose_lr(losses) for key, losses in grid_losses(results).items()}


def chosen_runs(results):
    """{(task, method): the runs (one per seed) at the chosen learning rate}."""
    return {
        key: _runs(results, "grid", *key, lr=lr) for key, (lr, _) in chosen_lrs(results).items()
    }


def final_scores(results, key=None):
    """{(task, method): seed_stats of the test score at the chosen rate}; ``key``: the score
    (default: each task's metric, ``exact``), in points (100 x)."""
    out = {}
    for (task, method), runs in chosen_runs(results).items():
        k = key or results["plan"]["tasks"][task]["metric"]
        out[task, method] = seed_stats([100 * r["test"][k] for r in runs])
    return out


def rank_results(results):
    """{(method, rank): (lr, bracketed, seed_stats of the far task's test score in points)}:
    at each rank, the rate of the method's grid with the lowest mean training loss."""
    plan, task = results["plan"], results["plan"]["rank_task"]
    metric, out = plan["tasks"][task]["metric"], {}
    for method in LORA_METHODS:
        for rank in plan["ranks"]:
            part = "grid" if rank == plan["methods"][method]["rank"] else "rank"
            runs = _runs(results, part, task, method, rank=rank)
            lr, bracketed = choose_lr(_losses(runs))
            scores = [100 * r["test"][metric] for r in runs if r["lr"] == lr]
            out[method, rank] = (lr, bracketed, seed_stats(scores))
    return out


# ---------------------------------------------------------------- the lesson's table, judged


def points_verdict(gap, limit=2.0):
    """``holds`` if LoRA trails by at most ``limit`` points, ``loose`` up to twice that, else
    ``wrong`` (a negative gap, LoRA ahead, holds)."""
    from .claims import HOLDS, LOOSE, WRONG

    finite_number("limit", limit)
    return HOLDS if gap <= limit else LOOSE if gap <= 2 * limit else WRONG


def gap_over_seeds(full, lora):
    """Mean gap in points (full minus LoRA) between two seed_stats, and its standard error."""
    se = math.sqrt(full["sd"] ** 2 / full["n"] + lora["sd"] ** 2 / lora["n"])
    return full["mean"] - lora["mean"], se


def lesson_verdicts(results, lora_method="LoRA attention"):
    """The lesson's comparison table judged from ``results`` (``read_compare``): a list of rows,
    each with the claim, what was measured, the threshold, ``value`` and the ``verdict``.

    Memory from the bytes of the runs' tensors and the rise of the process's memory; speed from
    the interleaved step timings, judged only when they are consistent with the FLOP bound;
    quality from the mean test score over seeds at each method's chosen learning rate.
    """
    from .claims import HOLDS, LOOSE, WRONG, judge

    plan = results["plan"]
    roles = {spec["role"]: task for task, spec in plan["tasks"].items()}
    close, far = roles["close"], roles["far"]
    chosen, scores = chosen_runs(results), final_scores(results)
    rows = []

    def add(row, says, measured, threshold, value, verdict):
        rows.append({"row": row, "lesson says": says, "measured": measured,
                     "threshold": threshold, "value": value, "verdict": verdict})  # fmt: skip

    state = {m: chosen[close, m][0]["state_bytes"] for m in ("full", lora_method)}
    ratio = state["full"] / state[lora_method]
    add("Memory (weights, grads, optimizer)", "56+ GB against 14 GB: 4x less",
        f"full / LoRA = {ratio:.2f}, measured on the tensors", "4x within 10%; loose: within 2x",
        ratio, judge(ratio, 56 / 14))  # fmt: skip
    rise = {m: [r["rss_rise"] for r in chosen[close, m]] for m in ("full", lora_method)}
    if all(v is not None for values in rise.values() for v in values):
        whole = statistics.median(rise["full"]) / statistics.median(rise[lora_method])
        add("Memory (whole training run)", "56+ GB against 14 GB: 4x less",
            f"full / LoRA = {whole:.2f}, rise in process RSS ({close}, median of seeds)",
            "4x within 10%; loose: within 2x", whole, judge(whole, 56 / 14))  # fmt: skip
    else:
        add("Memory (whole training run)", "56+ GB against 14 GB: 4x less",
            "not measurable here (no way to reset the peak RSS)", "", None, "n/a")  # fmt: skip
    speed = speed_summary(results["speed"]["seconds"], results["speed"]["flop_bound"])[lora_method]
    low, high = speed["middle_half"]  # a verdict must not hang on the timing's noise
    verdict = HOLDS if high <= 0.90 else WRONG if low > 1.10 else LOOSE
    add("Training speed", "LoRA faster (fewer gradients)",
        f"LoRA step = {speed['ratio']:.2f} x full step, middle half of samples {low:.2f}-{high:.2f} "
        f"(FLOP bound: at least {speed['bound']:.2f})",
        "middle half <= 0.90 holds, > 1.10 wrong, else loose", speed["ratio"],
        verdict if speed["consistent"] else "not judged: faster than the FLOP bound allows")  # fmt: skip
    gaps = {}
    for task in (close, far):
        full, lora = scores[task, "full"], scores[task, lora_method]
        gaps[task] = gap_over_seeds(full, lora)
        metric, n = plan["tasks"][task]["metric"], full["n"]
        add(f"Final performance ({task})", "LoRA within 1-2% of full",
            f"full {full['mean']:.1f} +/- {full['sd']:.1f}, LoRA {lora['mean']:.1f} +/- "
            f"{lora['sd']:.1f} {metric} (mean +/- sd of {n} seeds)",
            "gap <= 2 pts holds, <= 4 loose", gaps[task][0], points_verdict(gaps[task][0]))  # fmt: skip
    (g_close, se_close), (g_far, se_far) = gaps[close], gaps[far]
    noise = 2 * math.hypot(se_close, se_far)
    similar = HOLDS if g_far - g_close > max(2.0, noise) else LOOSE if g_far > g_close else WRONG
    add("Task similarity", "LoRA best for similar tasks",
        f"gap {g_close:.1f} pts ({close}), {g_far:.1f} pts ({far}); twice its standard error "
        f"{noise:.1f}", "far gap exceeds close gap by > 2 pts and > 2 se: holds; by less: loose",
        g_far - g_close, similar)  # fmt: skip
    n_lora = chosen[close, lora_method][0]["trainable"]
    adapter = 4 * n_lora / results["model_bytes"]  # float32 adapter against a model copy
    add("Adapter swapping", "LoRA yes, full no", f"an adapter file is {adapter:.1%} of a full copy",
        "adapter < 10% of the model", adapter, HOLDS if adapter < 0.10 else LOOSE)  # fmt: skip
    return rows


def committed_run(results, task, method, seed=0):
    """The committed run of ``method`` on ``task`` at its chosen learning rate with ``seed``."""
    key = (task, method)
    lrs = chosen_lrs(results)
    if key not in lrs:
        raise ValueError(f"no runs of {method!r} on {task!r}; the results have {sorted(lrs)}")
    runs = [r for r in _runs(results, "grid", task, method, lr=lrs[key][0]) if r["seed"] == seed]
    if not runs:
        raise ValueError(
            f"no committed run with seed {seed}; the seeds are {results['plan']['seeds']}"
        )
    return runs[0]


def reproduces(fresh, committed, *, loss_rtol=0.10, points=5.0):
    """Whether ``fresh`` (a Run) repeats ``committed`` (a run record of the same settings).

    On the machine that made the file a CPU rerun is bit for bit the same; elsewhere float
    rounding differs and grows over the steps, so the final training loss may differ by
    ``loss_rtol`` (relative) and each test score by ``points`` points. Returns ``(ok, why)``.
    """
    if not isinstance(fresh, Run):
        raise TypeError(f"fresh must be a Run (from finetune), got {type(fresh).__name__}")
    if committed.get("diverged"):
        raise ValueError("committed is a run that diverged: there is nothing to compare")
    same = {"task": fresh.task, "lr": fresh.lr, "seed": fresh.seed, "steps": fresh.history.steps}
    differ = {k: (v, committed[k]) for k, v in same.items() if committed[k] != v}
    if differ:
        raise ValueError(f"fresh and committed runs differ in their settings: {differ}")
    loss, old = fresh.final_train_loss(), committed["train_loss"]
    gaps = {k: 100 * abs(fresh.scores[k] - committed["test"][k]) for k in ("exact", "char_acc")}
    ok = abs(loss - old) <= loss_rtol * old and max(gaps.values()) <= points
    why = (
        f"final training loss {loss:.4f} (committed {old:.4f}); test exact "
        f"{100 * fresh.scores['exact']:.1f} (committed {100 * committed['test']['exact']:.1f})"
    )
    return ok, why
