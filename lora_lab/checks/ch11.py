"""Checkers for chapter 11, "Beyond LoRA"."""

import torch
import torch.nn as nn

from lora_lab.checks import check_function, check_number, named_slip, unanswered


def dora_extra_params(answer, model="llama-2-7b", targets=("q_proj", "v_proj")):
    """Exercise 1: how many more trainable parameters DoRA has than LoRA on ``targets``."""
    from lora_lab.specs import PRESETS

    if model not in PRESETS:
        raise ValueError(f"model must be one of {sorted(PRESETS)}, got {model!r}")
    spec = PRESETS[model]
    layers = spec.lora_targets(list(targets))  # (name, in_features, out_features) of each layer
    expected = sum(fout for _, _, fout in layers)
    why = (
        "DoRA adds one magnitude per output feature of each wrapped layer: the vector m has "
        "out_features entries, whatever the rank."
    )
    if answer is None:
        return unanswered(why)
    slips = [
        (expected / spec.num_layers, f"that is one block's; the model has {spec.num_layers}."),
        (sum(fin for _, fin, _ in layers), "that counts input features; m has one per output."),
    ]
    slip = named_slip(answer, expected, slips, rel_tol=1e-9)
    if slip is not None:
        return slip
    return check_number(answer, expected, what="DoRA's extra trainable parameters", why=why)


def loraplus_speedup(answer, sweep):
    """Exercise 2: how many times fewer steps the best LoRA+ ratio needs than LoRA (ratio 1)."""
    if not isinstance(sweep, dict) or 1 not in sweep:
        raise ValueError("sweep must be lora_lab.beyond.loraplus_sweep(results), with ratio 1")
    best = min((r for r in sweep if r != 1), key=lambda r: sweep[r]["steps_mean"])
    expected = sweep[1]["steps_mean"] / sweep[best]["steps_mean"]
    why = (
        "read steps_mean of ratio 1 (plain LoRA) and of the ratio with the fewest steps, and "
        "divide the first by the second."
    )
    if answer is None:
        return unanswered(why)
    slip = named_slip(
        answer,
        expected,
        [(1 / expected, "that is the inverse, LoRA+'s steps over LoRA's.")],
        rel_tol=0.01,
    )
    if slip is not None:
        return slip
    return check_number(
        answer, expected, what=f"LoRA's steps / LoRA+'s (ratio {best})", why=why, rel_tol=0.01
    )


def _dora_cases():
    """(label, kwargs, expected) cases whose answers come from lora_lab's DoRA layer."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    settings = [
        ("m = ||W + sBA||: DoRA equals plain LoRA", (6, 5), 2, None, "norm", True),
        ("B = 0, m = 2 ||W||: twice the base's W x", (4, 7), 1, 0.0, "double", True),
        ("random m, no bias", (5, 3), 2, None, "random", False),
        ("a batch of sequences (2, 3, in)", (8, 6), 3, None, "random", True),
    ]
    for label, (out_f, in_f), rank, b_scale, magnitude, bias in settings:
        base = nn.Linear(in_f, out_f, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=gen))
            if bias:
                base.bias.copy_(torch.randn(out_f, generator=gen))
        layer = _dora_layer(base, rank)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.randn(rank, in_f, generator=gen))
            B = torch.randn(out_f, rank, generator=gen)
            layer.lora_B.weight.copy_(B if b_scale is None else B * b_scale)
            norm = (layer.weight + layer.delta_weight()).norm(dim=1)
            m = {"norm": norm, "double": 2 * layer.weight.norm(dim=1)}.get(
                magnitude, norm * (0.5 + torch.rand(out_f, generator=gen))
            )
            layer.lora_magnitude_vector.copy_(m)
        shape = (2, 3, in_f) if "batch" in label else (4, in_f)
        x = torch.randn(*shape, generator=gen)
        kwargs = {
            "x": x,
            "W": layer.weight.detach().clone(),
            "b": None if not bias else layer.bias.detach().clone(),
            "A": layer.lora_A.weight.detach().clone(),
            "B": layer.lora_B.weight.detach().clone(),
            "m": m.clone(),
            "scaling": layer.scaling,
        }
        with torch.no_grad():
            cases.append((label, kwargs, layer(x)))
    return cases


def _dora_layer(base, rank):
    from lora_lab.lora import LoRALinear

    return LoRALinear(base, rank, alpha=3, use_dora=True).eval()


def dora_forward(fn):
    """Exercise 3 (code): DoRA's output for one layer, against lora_lab's DoRA layer."""
    return check_function(
        fn,
        _dora_cases(),
        what="dora_forward(x, W, b, A, B, m, scaling)",
        why=(
            "scale each output row of W + scaling * B @ A to length m: "
            "V = W + scaling * B @ A, then y = x @ (m[:, None] * V / ||V||_row).T + b."
        ),
        atol=1e-5,
    )
