"""Checkers for chapter 1, "The memory problem"."""

import math
import re

from lora_lab.checks import Result, check_function, check_number, unanswered
from lora_lab.estimate import GB, PRECISIONS, GiB, _trainable_bytes, estimate_memory
from lora_lab.specs import PRESETS


def _number(answer, what):
    """``answer`` as a float, or a Result saying why it is not a number."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return Result(False, f"{what} should be a number, got {type(answer).__name__} {answer!r}.")
    return float(answer)


def _known_slips(answer, expected, slips, rel_tol):
    """A Result naming every slip ``answer`` matches (right value, wrong reasoning), else None."""
    said = []
    for value, message in slips:
        near_expected = math.isclose(value, expected, rel_tol=rel_tol)
        if not near_expected and math.isclose(answer, value, rel_tol=rel_tol):
            said.append(message)
    if not said:
        return None
    return Result(False, f"{answer:,.6g} is not it: " + " Or: ".join(said))


def _check(answer, expected, slips, *, what, why, hint, rel_tol):
    """check_number, after looking for the slips a learner is likely to make."""
    if answer is None:
        return unanswered(hint)
    number = _number(answer, what)
    if isinstance(number, Result):
        return number
    slip = _known_slips(number, expected, slips, rel_tol)
    if slip is not None:
        return slip
    return check_number(number, expected, what=what, why=why, rel_tol=rel_tol, hint=hint)


def _preset(model):
    if model not in PRESETS:
        raise ValueError(f"model must be one of {list(PRESETS)}, got {model!r}")
    return PRESETS[model]


def full_finetune_gb(answer, model="llama-2-13b", precision="fp16"):
    """Exercise 1: GB (10**9 bytes) to fully fine-tune ``model`` with AdamW, lesson convention.

    Weights, gradients and AdamW's two states, all at ``precision``; no activations.
    """
    spec = _preset(model)
    est = estimate_memory(
        spec, "full", precision=precision, optimizer="adamw", convention="lesson", activations=False
    )
    n = est.num_parameters
    per_param = est.total / n  # 4 bytes per AdamW step counter make it a hair above 4*b
    slips = [
        (est.total / GiB, "that is the size in GiB (2**30 bytes); the lesson's GB are 10**9."),
        (
            16 * n / GB,
            "16 bytes per parameter is fp32 training, or real mixed precision; the lesson's "
            f"{precision} column keeps weights, gradients and both AdamW states at {precision}.",
        ),
        (
            (est.total - est.optimizer_states) / GB,
            "AdamW's two states (exp_avg and exp_avg_sq) are missing.",
        ),
    ]
    size = re.search(r"(\d+(?:\.\d+)?)b$", model)  # "llama-2-13b": 13e9, the name's round count
    if size:
        nominal = float(size.group(1)) * 1e9
        slips.append(
            (
                nominal * per_param / GB,
                f"{model} has {n:,} parameters, not {nominal:,.0f}: count them from the config.",
            )
        )
    return _check(
        answer,
        est.total / GB,
        slips,
        what=f"full AdamW fine-tuning of {model} at {precision} (lesson convention)",
        why=f"{n:,} parameters x (weights + gradients + 2 AdamW states) at "
        f"{precision}, about {per_param:g} bytes each.",
        hint="parameters from the config, times the bytes each keeps: weight, gradient and "
        "AdamW's two states, all at the same precision; GB = 10**9 bytes.",
        rel_tol=5e-4,
    )


def lora_share(answer, model="llama-2-7b", rank=16):
    """Exercise 2: the trainable share of LoRA on q/k/v/o at ``rank``, in percent.

    The course's one definition, PEFT's ``print_trainable_parameters``: trainable parameters
    over all parameters, the adapters included (``lora_lab.lora.count_parameters`` gives both).
    """
    _check_rank(rank)
    spec = _preset(model)
    n = spec.num_parameters()
    lora = spec.lora_parameters(rank)
    expected = 100 * lora / (n + lora)
    layers = spec.linear_layers()
    qv = (
        sum(
            rank * (fin + fout)
            for rel, (fin, fout, _) in layers.items()
            if rel.endswith(("q_proj", "v_proj"))
        )
        * spec.num_layers
    )
    r8 = spec.lora_parameters(8)
    slips = [
        (lora / (n + lora), "that is a fraction; the exercise asks for a percentage (times 100)."),
        (
            100 * lora / n,
            "you divided by the base model's parameters alone; the trainable share (PEFT's "
            "print_trainable_parameters, and this course) divides by all parameters, base + "
            "adapters.",
        ),
        (100 * r8 / (n + r8), f"that is rank 8; the exercise asks rank {rank}."),
        (100 * qv / (n + qv), "that is q_proj and v_proj only; the exercise adapts q, k, v and o."),
    ]
    return _check(
        answer,
        expected,
        slips,
        what=f"the trainable share of {model} with LoRA at rank {rank} on q/k/v/o (percent)",
        why=f"{lora:,} LoRA parameters (r * (d_in + d_out) per layer, 4 layers in each of "
        f"{spec.num_layers} blocks) out of {n + lora:,}: the base's {n:,} and the adapters.",
        hint="each adapted layer adds r * (d_in + d_out); there are 4 per block; divide by all "
        "parameters (base + adapters) and multiply by 100.",
        rel_tol=2e-3,
    )


def qlora_weight_gb(answer, model="llama-2-7b", precision="bf16"):
    """Exercise 3: GB of QLoRA's frozen base: NF4 linear weights (double quantised), the rest
    at ``precision``."""
    spec = _preset(model)
    est = estimate_memory(spec, "qlora", precision=precision, activations=False)
    single = estimate_memory(
        spec, "qlora", precision=precision, activations=False, double_quant=False
    )
    shapes = spec.parameter_shapes()
    linear = sum(
        math.prod(shapes[spec.layer_prefix(i) + rel + ".weight"])
        for i in range(spec.num_layers)
        for rel in spec.linear_layers()
    )
    rest = spec.num_parameters() - linear
    b = PRECISIONS[precision]
    nf4_per_weight = (est.weights - b * rest) / linear  # bytes, block constants included
    slips = [
        (
            single.weights / GB,
            "that is NF4 without double quantization (an fp32 absmax per 64 weights); "
            "QLoRA quantizes the absmaxes too.",
        ),
        (
            (linear / 2 + b * rest) / GB,
            "4 bits per weight leaves out the block constants (one absmax per 64 weights).",
        ),
        (
            nf4_per_weight * spec.num_parameters() / GB,
            f"only the blocks' linear layers are 4-bit; embeddings, norms and lm_head stay "
            f"{precision}.",
        ),
        (est.weights / GiB, "that is GiB (2**30 bytes); the answer is in GB = 10**9 bytes."),
    ]
    return _check(
        answer,
        est.weights / GB,
        slips,
        what=f"QLoRA's frozen {model} weights (GB)",
        why=f"{linear:,} linear weights at {8 * nf4_per_weight:.4f} bits each (4-bit codes, an "
        f"8-bit absmax per 64, an fp32 absmax per 256 of those) and {rest:,} more at {precision}.",
        hint="NF4 stores 4 bits per weight plus its block constants (lora_lab.estimate.nf4_bytes "
        "counts them); only the linear layers inside the blocks are quantized.",
        rel_tol=2e-3,
    )


def _check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


# ----------------------------------------------------------------------------- code exercise

_CONFIGS = [  # (label, numels, precision, optimizer, convention)
    ("two tensors", [1000, 10], "fp32", "adamw", "lesson"),
    ("two tensors", [1000, 10], "bf16", "adamw", "lesson"),
    ("two tensors", [1000, 10], "bf16", "adamw", "mixed"),
    ("two tensors", [1000, 10], "fp32", "adamw", "mixed"),
    ("two tensors", [1000, 10], "fp16", "sgd_momentum", "mixed"),
    ("two tensors", [1000, 10], "fp16", "sgd", "lesson"),
    ("Llama-2-7B", "llama-2-7b", "bf16", "adamw", "mixed"),
    ("GPT-2", "gpt2", "fp32", "sgd_momentum", "lesson"),
]


def full_state_bytes(fn):
    """Code exercise: ``fn(numels, precision, optimizer, convention)`` gives the bytes of full
    fine-tuning's weights, gradients, fp32 master weights and optimizer states.

    Run on several set-ups, each against ``lora_lab.estimate`` (``estimate_memory`` for a
    preset's tensors): fp32, bf16 and fp16; AdamW (two states and a 4-byte step counter per
    tensor), SGD with momentum (one state), plain SGD; the lesson's and mixed conventions.
    """
    cases = []
    for label, numels, precision, optimizer, convention in _CONFIGS:
        if isinstance(numels, str):
            spec = PRESETS[numels]
            est = estimate_memory(
                spec,
                "full",
                precision=precision,
                optimizer=optimizer,
                convention=convention,
                activations=False,
            )
            expected = est.weights + est.gradients + est.master_weights + est.optimizer_states
            numels = [math.prod(s) for s in spec.parameter_shapes().values()]
            label = f"{label}'s {len(numels)} tensors"
        else:
            expected = sum(_trainable_bytes(numels, PRECISIONS[precision], optimizer, convention))
        kwargs = dict(
            numels=numels, precision=precision, optimizer=optimizer, convention=convention
        )
        cases.append((f"{label}, {precision}, {optimizer}, {convention}", kwargs, expected))
    return check_function(
        fn,
        cases,
        what="your full_state_bytes",
        why="per parameter: the weight and its gradient at the precision; under 'mixed' a "
        "16-bit weight adds a 4-byte master copy and the optimizer's states are fp32 (under "
        "'lesson' they are at the precision); AdamW keeps 2 states per parameter and a 4-byte "
        "step counter per tensor, SGD with momentum 1 state, SGD none.",
    )
