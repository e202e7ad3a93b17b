"""Short fine-tuning experiments: a fresh copy of a base model, adapted, trained and scored.

Chapters 8 and 9 compare many small runs. Each run here starts from the same pretrained
weights, seeds its LoRA initialisation and its batches, and reports what those chapters
tabulate: trainable parameters, bytes, step time, loss and test scores.
"""

import copy
import statistics
from dataclasses import dataclass, field

import torch

from .data import as_task
from .hub import HALF
from .lora import apply_lora, count_parameters
from .measure import current_rss, release_free_memory, reset_peak_rss
from .training import score, train
from .utils import set_seed
from .validate import int_at_least, module_with_parameters

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
    base, task, steps, lr, *, lora=None, batch_size=16, seed=0, tokenizer=None, progress=False
):
    """Train a copy of ``base`` on ``task`` and score it; ``base`` itself is left untouched.

    ``lora`` is a dict of ``apply_lora`` arguments (e.g. ``{"rank": 8, "alpha": 16}``) for a
    LoRA run, or None to fine-tune every parameter. Full fine-tuning of a 16-bit ``base``
    trains a float32 copy (master weights) with the matmuls in the base's 16-bit type
    (``train``'s ``autocast_dtype``), and scores it the same way; LoRA keeps the 16-bit base
    and float32 adapters. Returns a :class:`Run`.
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
                    autocast_dtype=autocast_dtype)  # fmt: skip
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
