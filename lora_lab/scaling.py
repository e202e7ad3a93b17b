"""How large LoRA's update gets in its first optimizer steps, for a rank and a scaling rule.

The update of a LoRA layer is ``scaling * B @ A`` with ``scaling = alpha / r`` (the LoRA
paper) or ``alpha / sqrt(r)`` (rsLoRA). ``B`` starts at zero, so its size after training comes
from the optimizer's steps, and AdamW and SGD take very different ones: AdamW's first step
moves every entry of ``B`` by the learning rate whatever its gradient's size, SGD's by the
learning rate times the gradient, itself proportional to ``scaling``. ``update_size`` trains a
fresh LoRA copy of a layer or a model for a few steps and measures the update several ways;
chapters 3 and 9 both call it.

Its main measure is the part of the update along the gradient ``G = dL/dW`` of the weight it
adapts, taken on the first batch before any step: ``<-G, scaling * B A> / ||G||``. To first
order the loss falls by ``||G||`` times it, so it is the part of the update that does the
learning; the rest of ``B A`` points in directions the loss does not care about at first.
"""

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .lora import DEFAULT_TARGETS, LoRALinear, apply_lora, is_conv1d, lora_layers
from .utils import set_seed
from .validate import choice, finite_number, int_at_least, integer, module_with_parameters

RULES = {"alpha/r": False, "alpha/sqrt(r)": True}  # rule -> LoRALinear's use_rslora
OPTIMIZERS = ("adamw", "sgd")
# linear_task's inputs come from their own stream: seeded like A's init (set_seed), they would
# repeat its random numbers and correlate with A
_DATA_SEED = 7_919_000_000


@dataclass(frozen=True)
class UpdateSize:
    """The update after ``steps`` steps of one LoRA run; sums run over every adapted layer."""

    rank: int
    rule: str  # "alpha/r" or "alpha/sqrt(r)"
    scaling: float
    optimizer: str  # "adamw" or "sgd"
    lr: float
    steps: int
    b_rms: float  # root mean square of B's entries
    norm: float  # ||scaling * B A||_F, the update's whole size
    along_gradient: float  # <-G, scaling * B A> / ||G||_F: the part that lowers the loss
    loss_before: float  # the first batch's loss before training (eval mode)
    loss_after: float  # and after
    output_change: float | None  # RMS change of the outputs on ``probe`` (None without one)

    def row(self):
        """A flat dict, one row of a table."""
        return asdict(self)


def _wrap(model, rank, alpha, use_rslora, target_modules):
    """A LoRA copy of ``model``: an nn.Linear (or Conv1D) wrapped whole, else apply_lora."""
    model = copy.deepcopy(model)
    if isinstance(model, nn.Linear) or is_conv1d(model):
        return LoRALinear(model, rank=rank, alpha=alpha, use_rslora=use_rslora)
    return apply_lora(
        model, rank=rank, alpha=alpha, target_modules=target_modules, use_rslora=use_rslora
    )


def _outputs(model, probe):
    out = model(probe)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def _loss(loss_fn, model, step):
    loss = loss_fn(model, step)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r}")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()} at step {step}: lower lr")
    return loss


def _weight_gradients(model, layers, loss_fn):
    """dL/dW (out, in) of each adapted layer's frozen weight, on the first batch."""
    weights = [layer.base_layer.weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    try:
        _loss(loss_fn, model, 0).backward()
        grads = [
            (w.grad.T if layer.fan_in_fan_out else w.grad).float().clone()
            for layer, w in zip(layers, weights, strict=True)
        ]
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    for p in model.parameters():
        p.grad = None  # the LoRA factors got gradients too: the optimizer starts clean
    return grads


def update_size(
    model,
    loss_fn,
    *,
    rank,
    alpha=16,
    rule="alpha/r",
    steps=1,
    lr=1e-3,
    optimizer="adamw",
    target_modules=DEFAULT_TARGETS,
    seed=0,
    probe=None,
):
    """Train a fresh LoRA copy of ``model`` for ``steps`` steps and measure its update.

    ``model``: an ``nn.Linear`` (wrapped whole) or a model (``apply_lora`` on
    ``target_modules``); it is not changed. ``loss_fn(lora_model, step)`` returns the scalar
    loss of batch ``step`` (0, 1, ...); it must give the same batch for the same step. ``rule``
    is ``"alpha/r"`` or ``"alpha/sqrt(r)"``; ``optimizer`` ``"adamw"`` (weight decay 0, as
    ``lora_lab.train``) or ``"sgd"``; no gradient clipping. ``seed`` fixes ``A``'s random init,
    so both rules start from the same ``A`` at a rank. ``probe``: inputs whose outputs are
    compared before and after (logits for a language model). Returns an ``UpdateSize``.
    """
    module_with_parameters("model", model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (model, step) -> loss, got {loss_fn!r}")
    choice("rule", rule, RULES)
    choice("optimizer", optimizer, OPTIMIZERS)
    int_at_least("steps", steps)
    finite_number("lr", lr)
    integer("seed", seed)
    if probe is not None and not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a tensor of inputs or None, got {type(probe).__name__}")
    set_seed(seed)
    lora_model = _wrap(model, rank, alpha, RULES[rule], target_modules)
    layers = list(lora_layers(lora_model).values())
    was_training = lora_model.training
    try:
        lora_model.eval()
        with torch.no_grad():
            before = _loss(loss_fn, lora_model, 0).item()
            out_before = None if probe is None else _outputs(lora_model, probe)
        lora_model.train()
        grads = _weight_gradients(lora_model, layers, loss_fn)
        params = [p for p in lora_model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        else:
            opt = torch.optim.SGD(params, lr=lr)
        for step in range(steps):
            _loss(loss_fn, lora_model, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        lora_model.eval()
        with torch.no_grad():
            after = _loss(loss_fn, lora_model, 0).item()
            change = None
            if probe is not None:
                change = (_outputs(lora_model, probe) - out_before).pow(2).mean().sqrt().item()
            deltas = [layer.delta_weight().float() for layer in layers]  # (out, in) each
            b = torch.cat([layer.lora_B.weight.float().flatten() for layer in layers])
            g_norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads))
            along = -sum((g * d).sum().item() for g, d in zip(grads, deltas, strict=True))
    finally:
        lora_model.train(was_training)
    return UpdateSize(
        rank=rank,
        rule=rule,
        scaling=layers[0].scaling,
        optimizer=optimizer,
        lr=lr,
        steps=steps,
        b_rms=b.pow(2).mean().sqrt().item(),
        norm=math.sqrt(sum(d.pow(2).sum().item() for d in deltas)),
        along_gradient=along / g_norm if g_norm > 0 else 0.0,
        loss_before=before,
        loss_after=after,
        output_change=change,
    )


def rank_sweep(model, loss_fn, ranks, rules=tuple(RULES), **kwargs):
    """``update_size`` at every rank of ``ranks`` under every rule of ``rules``: a list."""
    if not ranks:
        raise ValueError(f"ranks must be a non-empty list of ranks, got {ranks!r}")
    for rule in rules:
        choice("rule", rule, RULES)
    return [
        update_size(model, loss_fn, rank=r, rule=rule, **kwargs) for rule in rules for r in ranks
    ]


# ----------------------------------------------------------------------------- losses


def linear_task(base, delta, batch_size=64, seed=0):
    """``loss_fn`` teaching a layer to add ``delta`` (out, in) to ``base`` (an nn.Linear).

    Batch ``step`` is ``batch_size`` inputs with independent unit-normal entries (drawn from
    ``seed`` and ``step``, so the same step gives the same batch); the loss is the mean squared
    error between the model's outputs and ``base(x) + x @ delta.T``.
    """
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
    shape = (base.out_features, base.in_features)
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != shape:
        got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a tensor of base's weight shape {shape}, got {got}")
    int_at_least("batch_size", batch_size)
    integer("seed", seed)
    base = copy.deepcopy(base).requires_grad_(False)
    delta = delta.detach().to(base.weight)

    def loss_fn(model, step):
        gen = torch.Generator().manual_seed(_DATA_SEED + 1_000_003 * seed + step)
        x = torch.randn(batch_size, shape[1], generator=gen).to(base.weight)
        with torch.no_grad():
            target = base(x) + x @ delta.T
        return (model(x) - target).pow(2).mean()

    return loss_fn


def task_loss(task, tokenizer=None, batch_size=16, seed=0):
    """``loss_fn`` on a task's train split: batch ``step`` as ``lora_lab.train`` draws it.

    Batches come from reshuffled passes over the split (``seed``'s own generator); the loss is
    the mean cross-entropy on the target tokens. ``tokenizer`` None: the shipped model's.
    """
    import torch.nn.functional as F

    from .data import as_task
    from .training import IGNORE, _context_length, _tokenizer, encode_pairs, logits_of, make_batch

    task = as_task(task)
    int_at_least("batch_size", batch_size)
    integer("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    batches, order, examples = [], [], []

    def loss_fn(model, step):
        if not examples:  # encoded once, on the first call
            tok = _tokenizer(model, tokenizer)
            examples.extend(encode_pairs(task.train, tok, _context_length(model)))
        while len(batches) <= step:
            while len(order) < batch_size:
                order.extend(torch.randperm(len(examples), generator=gen).tolist())
            batches.append(order[:batch_size])
            del order[:batch_size]
        device = next(model.parameters()).device
        x, y = make_batch([examples[i] for i in batches[step]], device)
        logits = logits_of(model, x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)

    return loss_fn
