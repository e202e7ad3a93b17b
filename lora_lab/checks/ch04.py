"""Checkers for chapter 4, "LoRA in a transformer"."""

import copy

from lora_lab.checks import Result, check_function, check_number, unanswered

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# Phi3ForCausalLM's linear layers in one block (fused q/k/v and fused gate/up), and its head
PHI3_BLOCK = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
PHI3_LAYERS = 32  # Phi-3-mini
RULE_OPTIONS = {
    "a": ["o_proj"],
    "b": ["v_proj"],
    "c": ["up_proj"],
    "d": ["down_proj"],
    "e": ["proj"],
}


def mistral_attention_lora(answer, rank=16):
    """Exercise 1: LoRA parameters on Mistral-7B's four attention projections at ``rank``."""
    from lora_lab.specs import PRESETS

    spec = PRESETS["mistral-7b"]
    expected = spec.lora_parameters(rank=rank, target_modules=list(ATTENTION))
    d, layers = spec.hidden_size, spec.num_layers
    no_gqa = layers * 4 * rank * 2 * d
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if number and answer == no_gqa:
        kv = spec.kv_heads * spec.dim_per_head
        return Result(
            False,
            f"that treats k_proj and v_proj as {d}x{d}; with grouped-query "
            f"attention they are {kv}x{d}.",
        )
    if number and answer * layers == expected:
        return Result(False, f"that is one block; the model has {layers}.")
    why = (
        f"q and o add r(d + d) each, k and v only r(d + {spec.kv_heads * spec.dim_per_head}) "
        f"each, in each of {layers} blocks."
    )
    hint = (
        "per block: r * (4096 + 4096) for q_proj and o_proj, r * (4096 + 1024) for k_proj "
        "and v_proj; then times the number of blocks."
    )
    if number and answer == expected:
        return Result(True, f"{expected:,} parameters. {why}")
    if number:
        return Result(False, f"the count is {expected:,}, you have {answer:,}. {hint}")
    return check_number(answer, expected, what="the count", why=why, hint=hint)


def shipped_model():
    """The shipped GPT (on the best device here), for exercise 2."""
    from lora_lab.model import load_pretrained

    return load_pretrained()


def mlp_share(answer, rank=8):
    """Exercise 2: trainable share of the shipped model with LoRA on the MLP layers only."""
    from lora_lab.lora import apply_lora, count_parameters

    if answer is None:
        return unanswered(
            "wrap a copy with target_modules=['gate_proj', 'up_proj', "
            "'down_proj'] and divide count_parameters' two numbers."
        )
    model = apply_lora(copy.deepcopy(shipped_model()), rank=rank, target_modules=list(MLP))
    trainable, total = count_parameters(model)
    expected = trainable / total
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if number and abs(answer - 100 * expected) < 1e-3 * 100 * expected:
        return Result(False, f"that is a percentage; give the fraction, {expected:.4f}.")
    if number and abs(answer - trainable / (total - trainable)) < 1e-6:
        return Result(
            False,
            "that divides by the base model's parameters alone; the course uses PEFT's "
            "definition, trainable / (base + adapters), as count_parameters and PEFT's "
            "print_trainable_parameters do.",
        )
    return check_number(
        answer,
        expected,
        what=f"the MLP-only trainable share at rank {rank}",
        rel_tol=1e-3,
        why=f"{trainable:,} trainable of {total:,} parameters, adapters included (PEFT's "
        "definition): each block adds r(d + d_ff) for each of its three MLP layers.",
    )


def _phi3_linear_names():
    names = [f"model.layers.{i}.{rel}" for i in range(PHI3_LAYERS) for rel in PHI3_BLOCK]
    return names + ["lm_head"]


def _selects(rule, targets):
    if rule == "substring":
        return [n for n in _phi3_linear_names() if any(t in n for t in targets)]
    return [n for n in _phi3_linear_names() if any(n == t or n.endswith("." + t) for t in targets)]


def rules_differ(answer):
    """Exercise 3: which of RULE_OPTIONS the substring and suffix rules treat differently."""
    if answer is None:
        return unanswered(
            "for each list, ask which Phi-3 layer names contain the string and "
            "which end with '.' + the string."
        )
    listed = isinstance(answer, (list, tuple, set))
    if not listed or not all(isinstance(a, str) for a in answer):
        return Result(False, f"answer with a list of letters such as ['a', 'c'], got {answer!r}.")
    given = {a.strip().lower() for a in answer}
    unknown = given - set(RULE_OPTIONS)
    if unknown:
        return Result(
            False, f"the options are {sorted(RULE_OPTIONS)}; {sorted(unknown)} is not one."
        )
    expected = {
        k for k, t in RULE_OPTIONS.items() if _selects("substring", t) != _selects("suffix", t)
    }
    if given == expected:
        return Result(
            True,
            f"{sorted(expected)}: 'v_proj' and 'up_proj' sit inside the fused "
            "'qkv_proj' and 'gate_up_proj', and 'proj' is inside every name but "
            "ends none after a dot.",
        )
    missed, extra = sorted(expected - given), sorted(given - expected)
    why = []
    if missed:
        why.append(f"{missed} also differ{'s' if len(missed) == 1 else ''}")
    if extra:
        why.append(f"{extra} select{'s' if len(extra) == 1 else ''} the same layers under both")
    return Result(False, "; ".join(why) + ". Look for targets that occur inside a longer name.")


# Exercise 4: (label, name, targets, selected?) for the suffix rule. Names are real ones: the
# shipped GPT's (Llama's), Phi-3's fused layers, GPT-2's two c_proj, and a wrapped layer's parts.
MATCH_CASES = [
    ("a top-level name, matched whole", "lm_head", ["lm_head"], True),
    ("a nested name ends with the target", "model.layers.0.self_attn.q_proj", ["q_proj"], True),
    ("any one target is enough", "model.layers.3.self_attn.v_proj", ["q_proj", "v_proj"], True),
    ("no target", "model.layers.3.mlp.down_proj", ["q_proj", "v_proj"], False),
    ("Phi-3's fused layer is not v_proj", "model.layers.0.self_attn.qkv_proj", ["v_proj"], False),
    (
        "Phi-3's fused layer by its own name",
        "model.layers.7.self_attn.qkv_proj",
        ["qkv_proj"],
        True,
    ),
    (
        "Phi-3's fused MLP layer is not up_proj",
        "model.layers.2.mlp.gate_up_proj",
        ["up_proj"],
        False,
    ),
    ("a target with a dot in it", "transformer.h.0.attn.c_proj", ["attn.c_proj"], True),
    ("the other c_proj", "transformer.h.0.mlp.c_proj", ["attn.c_proj"], False),
    ("a part of a wrapped layer", "model.layers.0.self_attn.q_proj.lora_A", ["q_proj"], False),
    ("a module above the target", "model.layers.0.self_attn", ["q_proj"], False),
]


def suffix_matcher(fn):
    """Exercise 4: ``fn(name, targets)`` must say whether PEFT's suffix rule selects ``name``."""
    cases = [
        (label, {"name": name, "targets": targets}, selected)
        for label, name, targets, selected in MATCH_CASES
    ]
    return check_function(
        fn,
        cases,
        what="your matcher",
        why="a module is selected when its full name is a target or ends with '.' + a target: "
        "whole names after a dot, never letters inside a longer name (v_proj in qkv_proj).",
    )
