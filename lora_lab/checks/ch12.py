"""Checkers for chapter 12, "Serving many adapters"."""

import math

import torch
import torch.nn as nn

from lora_lab.checks import Result, check_function, unanswered

VLLM_RANKS = (8, 16, 64)  # exercise 3: the ranks of the adapters to serve


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- exercise 1


def _reference(x, weight, bias, adapters, adapter_names):
    """The package's answer: a MultiLoRALinear holding ``adapters``, run on a mixed batch."""
    from lora_lab.serving import add_adapter, mixed_batch, multi_lora_layers

    out_f, in_f = weight.shape
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(in_f, out_f, bias=bias is not None))
    with torch.no_grad():
        net.proj.weight.copy_(weight)
        if bias is not None:
            net.proj.bias.copy_(bias)
    for name, (A, B, scaling) in adapters.items():
        rank = A.shape[0]
        add_adapter(net, name, rank=rank, alpha=scaling * rank, target_modules=["proj"])
        layer = multi_lora_layers(net)["proj"]
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
    with torch.no_grad(), mixed_batch(net.eval(), adapter_names):
        return net(x)


def _mixed_cases():
    g = torch.Generator().manual_seed(12)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    weight, bias = rand(6, 5), rand(6)
    adapters = {
        "pirate": (rand(2, 5), rand(6, 2), 2.0),
        "butler": (rand(3, 5), rand(6, 3), 0.5),
    }
    x3, x2 = rand(4, 3, 5), rand(5, 5)
    specs = [
        ("two adapters and a base row", x3, bias, ["pirate", "butler", None, "pirate"]),
        ("'__base__' names the base model too", x3, bias, ["__base__", "butler", "butler", None]),
        ("every row the same adapter", x3, bias, ["butler"] * 4),
        ("every row the base model", x3, bias, [None] * 4),
        (
            "a layer without bias, 2-D input",
            x2,
            None,
            ["butler", "pirate", None, "pirate", "butler"],
        ),
    ]
    cases = []
    for label, x, b, names in specs:
        kwargs = dict(x=x, weight=weight, bias=b, adapters=adapters, adapter_names=names)
        cases.append((label, kwargs, _reference(**kwargs)))
    return cases


def mixed_forward(fn):
    """Exercise 1 (code): the mixed-batch forward of one linear layer, rows grouped by adapter."""
    return check_function(
        fn,
        _mixed_cases(),
        what="mixed_forward",
        why="each row gets W x + b plus its own adapter's scaling * B (A x); rows of one "
        "adapter share one pair of low-rank products, as lora_lab.serving.MultiLoRALinear does.",
        atol=1e-5,
    )


# ----------------------------------------------------------------------------- exercise 2


def adapters_per_copy(answer, rank=16, targets=("q_proj", "v_proj")):
    """Exercise 2: how many fp16 adapters of Llama-2-7B fit in the bytes of one fp16 copy."""
    from lora_lab.specs import PRESETS

    spec = PRESETS["llama-2-7b"]
    base_bytes = 2 * spec.num_parameters()
    adapter_bytes = 2 * spec.lora_parameters(rank, targets)
    expected = base_bytes // adapter_bytes
    if answer is None:
        return unanswered(
            "divide the bytes of one fp16 copy of the model (2 bytes a parameter) by the bytes "
            "of one fp16 adapter (2 bytes for each number of A and B), and round down."
        )
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if not _is_int(answer):
        return Result(False, f"the count should be a whole number, got {answer!r}.")
    slips = [
        (base_bytes // (2 * adapter_bytes), "that is fp32 adapters (4 bytes a number); use fp16."),
        (2 * expected, "that counts A or B alone; an adapter holds both per layer."),
        (expected // spec.num_layers, "that counts one block's adapter against the whole model."),
        (math.ceil(base_bytes / adapter_bytes), "round down: a part of an adapter is no adapter."),
    ]
    for value, why in slips:
        if value != expected and answer == value:
            return Result(False, f"{answer:,} is not it: {why}")
    if answer == expected:
        return Result(
            True,
            f"{expected:,} adapters of {adapter_bytes / 2**20:.0f} MiB take the "
            f"{base_bytes / 1e9:.1f} GB of one merged copy: serving them unmerged on one base "
            "costs about as much memory as two models, merging each would cost "
            f"{expected:,} models.",
        )
    return Result(
        False,
        f"{answer:,} is not it. Bytes of the base: 2 x {spec.num_parameters():,}; of one "
        f"adapter: 2 x {spec.num_layers} blocks x {len(targets)} layers x r (d_in + d_out).",
    )


# ----------------------------------------------------------------------------- exercise 3


def vllm_settings(answer, ranks=VLLM_RANKS):
    """Exercise 3: ``{"max_loras": ..., "max_lora_rank": ...}`` for a batch mixing all adapters."""
    expected = {"max_loras": len(ranks), "max_lora_rank": max(ranks)}
    if answer is None:
        return unanswered(
            "max_loras is how many different adapters one batch may hold; max_lora_rank the "
            "largest rank vLLM reserves room for."
        )
    if not isinstance(answer, dict) or set(answer) != set(expected):
        return Result(
            False, f"answer with a dict with the keys {sorted(expected)}, got {answer!r}."
        )
    loras, rank = answer["max_loras"], answer["max_lora_rank"]
    if not (_is_int(loras) and _is_int(rank)):
        return Result(False, f"both settings are whole numbers, got {answer!r}.")
    if rank == sum(ranks):
        return Result(False, "max_lora_rank is a bound on each adapter's rank, not their sum.")
    if rank < max(ranks):
        return Result(
            False,
            f"max_lora_rank={rank} is below the rank-{max(ranks)} adapter: vLLM refuses to load it.",
        )
    if loras < len(ranks):
        return Result(
            False,
            f"max_loras={loras}: a batch could then hold only {loras} of the {len(ranks)} "
            "adapters; requests for the others would wait for a later batch.",
        )
    if answer != expected:
        return Result(
            False,
            f"{answer} works but reserves more GPU memory than needed: vLLM allocates "
            "max_loras slots of max_lora_rank each; ask for no more than the adapters need.",
        )
    return Result(
        True,
        f"{expected}: vLLM keeps max_loras adapters in GPU slots padded to max_lora_rank, so "
        "these are the smallest settings that let one batch mix all three.",
    )
