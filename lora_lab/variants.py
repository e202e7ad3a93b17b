"""LoRA's variants (chapter 11): DoRA's weight norm, PiSSA and LoftQ starts, LoRA+'s optimizer.

Each is the small piece of math a variant adds to the LoRA layer of ``lora.py``; the layer
calls these, with PEFT's names (``use_dora``, ``init_lora_weights="pissa"`` / ``"loftq"``,
``loftq_config``, ``loraplus_lr_ratio``). rsLoRA needs no piece of its own: it is only the
scaling ``alpha / sqrt(r)`` that the layer already computes.
"""

import torch

from . import validate

INIT_CHOICES = (True, False, "gaussian", "pissa", "loftq")  # init_lora_weights lora_lab accepts
LOFTQ_BITS = (2, 3, 4)  # the NF widths lora_lab's quantizer makes (quant.nf_levels)
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults


def check_init(init_lora_weights):
    """Validate ``init_lora_weights``: one of INIT_CHOICES (PEFT's names)."""
    ok = isinstance(init_lora_weights, bool) or (
        isinstance(init_lora_weights, str) and init_lora_weights in INIT_CHOICES
    )
    if not ok:
        raise validate.bad_choice("init_lora_weights", init_lora_weights, INIT_CHOICES)
    return init_lora_weights


def _check_bits(name, bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LOFTQ_BITS:
        raise validate.bad_choice(name, bits, LOFTQ_BITS)


def check_loftq_config(loftq_config):
    """``loftq_config`` as PEFT's LoftQConfig dict: ``{"loftq_bits": 2|3|4, "loftq_iter": >=1}``."""
    if loftq_config is None:
        return dict(LOFTQ_DEFAULTS)
    if not isinstance(loftq_config, dict):
        raise TypeError(
            "loftq_config must be None or a dict like {'loftq_bits': 4, 'loftq_iter': 1}, "
            f"got {type(loftq_config).__name__} {loftq_config!r}"
        )
    unknown = sorted(set(loftq_config) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ValueError(
            f"loftq_config has unknown keys {unknown}; valid keys are {sorted(LOFTQ_DEFAULTS)}"
        )
    config = {**LOFTQ_DEFAULTS, **loftq_config}
    _check_bits("loftq_config['loftq_bits']", config["loftq_bits"])
    validate.int_at_least("loftq_config['loftq_iter']", config["loftq_iter"])
    return config


# ----------------------------------------------------------------------------- DoRA


def dora_weight_norm(weight, delta):
    """The norm of each output row of ``weight + delta`` (both (out, in)): DoRA's ||W + dW||_c.

    DoRA writes W' = m * (W + dW) / ||W + dW||_c, one magnitude m_i per output feature; the
    paper calls the norm "column-wise" because it writes weights as (in, out).
    """
    return torch.linalg.vector_norm(weight + delta, dim=1)  # (out,)


# ----------------------------------------------------------------------------- PiSSA


@torch.no_grad()
def pissa_factors(weight, rank, scaling):
    """PiSSA's start: ``(A, B, residual)`` with ``scaling * B @ A`` the top-``rank`` SVD part of W.

    W = U S V^T; A = sqrt(S_r / scaling) V_r^T (rank, in), B = U_r sqrt(S_r / scaling)
    (out, rank), and the frozen residual is W - scaling * B @ A (the smaller singular values).
    Computed in float32 whatever ``weight``'s dtype; the residual comes back in that dtype.
    """
    validate.matrix("weight", weight)
    validate.int_between("rank", rank, 1, min(weight.shape))
    validate.finite_number("scaling", scaling)
    w = weight.detach().float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)  # (rank,)
    A = root[:, None] * Vh[:rank]  # (rank, in)
    B = U[:, :rank] * root[None, :]  # (out, rank)
    return A, B, (w - scaling * (B @ A)).to(weight.dtype)


# ----------------------------------------------------------------------------- LoftQ


@torch.no_grad()
def loftq_factors(weight, rank, num_bits=4, num_iter=1, blocksize=64):
    """LoftQ's start: ``(A, B, Q)``, Q a dequantized NF weight and B @ A the SVD of W - Q.

    Alternates ``num_iter`` times (``loftq_steps``): quantize the part low rank does not hold,
    Q = NF(W - B A), then refit B A to the top-``rank`` SVD of W - Q. As in PEFT, A and B are
    not divided by the layer's scaling: the start is Q + scaling * B A, which equals LoftQ's
    Q + B A only when scaling is 1 (alpha = r; PEFT issue #1982).
    """
    validate.int_at_least("num_iter", num_iter)
    for step, factors in enumerate(loftq_steps(weight, rank, num_bits, blocksize), start=1):
        if step == num_iter:
            return factors


def loftq_steps(weight, rank, num_bits=4, blocksize=64):
    """LoftQ's alternation, one ``(A, B, Q)`` per step, for as many steps as are taken from it.

    Q = NF(W - B A) on the course's NF levels of ``num_bits`` bits (B A = 0 at first), then
    B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T from the SVD of W - Q (sqrt of each singular
    value on each side, as PEFT splits it). Computed in float32; Q comes back in W's dtype.
    """
    from .quant import nf_roundtrip

    validate.matrix("weight", weight)
    validate.int_between("rank", rank, 1, min(weight.shape))
    _check_bits("num_bits", num_bits)
    w = weight.detach().float()
    residual = w
    while True:
        with torch.no_grad():
            Q = nf_roundtrip(residual, num_bits, blocksize)  # (out, in): NF levels x absmax
            U, S, Vh = torch.linalg.svd(w - Q, full_matrices=False)
            root = torch.sqrt(S[:rank])
            B, A = U[:, :rank] * root[None, :], root[:, None] * Vh[:rank]  # (out, r), (r, in)
            residual = w - B @ A
        yield A, B, Q.to(weight.dtype)


# ----------------------------------------------------------------------------- LoRA+


def loraplus_groups(model):
    """``{"A": [...], "B": [...], "B_no_decay": [...]}``: trainable parameters as LoRA+ splits them.

    PEFT's rule: the B side holds every ``lora_B`` weight and every 1-D trainable parameter
    (a DoRA magnitude, a bias), biases without weight decay; the rest is on the A side.
    """
    validate.module("model", model)
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError("model has no trainable parameters; apply LoRA first")
    return groups


def create_loraplus_optimizer(
    model,
    optimizer_cls=torch.optim.AdamW,
    *,
    lr,
    loraplus_lr_ratio,
    loraplus_weight_decay=0.0,
    **kwargs,
):
    """An optimizer whose B side learns ``loraplus_lr_ratio`` times faster than its A side (LoRA+).

    A-side parameters (``loraplus_groups``) train at ``lr``, B-side ones at
    ``lr * loraplus_lr_ratio``, with ``loraplus_weight_decay`` (none on biases), as PEFT's
    ``create_loraplus_optimizer``; ``kwargs`` go to ``optimizer_cls``.
    """
    validate.finite_number("lr", lr)
    validate.finite_number("loraplus_lr_ratio", loraplus_lr_ratio)
    validate.finite_number("loraplus_weight_decay", loraplus_weight_decay, inclusive=True)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    parts = loraplus_groups(model)
    fast = lr * loraplus_lr_ratio
    groups = [
        {"params": parts["A"], "lr": lr, "weight_decay": loraplus_weight_decay},
        {"params": parts["B"], "lr": fast, "weight_decay": loraplus_weight_decay},
        {"params": parts["B_no_decay"], "lr": fast, "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)
