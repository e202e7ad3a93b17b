"""Checkers for chapter 7, "Saving, loading, swapping"."""

import copy
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from lora_lab.checks import Result, _describe, unanswered


def _is_number(answer):
    return isinstance(answer, (int, float)) and not isinstance(answer, bool)


def _check_count(answer, expected, *, what, unit, why, hint):
    """Compare a whole-number answer with ``expected`` exactly (counts, not measurements).

    ``what`` and ``unit`` read as a sentence: "<what> is <expected> <unit>."
    """
    if answer is None:
        return unanswered(hint)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if not _is_number(answer):
        return Result(False, f"{what} should be a number, got {type(answer).__name__} {answer!r}.")
    if answer == expected:
        return Result(True, f"{what} is {expected:,}{' ' + unit if unit else ''}. {why}")
    return Result(False, f"{what} is not {answer:,}. {hint}")


def adapter_bytes_13b(answer, rank=16, targets=("q_proj", "v_proj"), bytes_per_number=2):
    """Exercise 1: bytes of tensor data of a LoRA adapter on Llama-2-13B (bf16 by default)."""
    from lora_lab.specs import PRESETS

    spec = PRESETS["llama-2-13b"]
    numbers = spec.lora_parameters(rank, targets)
    expected = numbers * bytes_per_number
    slips = [  # (value, why it is wrong); the first match wins
        (numbers, "that is the number of LoRA parameters; multiply by the bytes per number."),
        (numbers * 4, "that is fp32 (4 bytes per number); bf16 takes 2."),
        (
            expected // spec.num_layers,
            f"that is one block; Llama-2-13B has {spec.num_layers} of them.",
        ),
    ]
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if _is_number(answer):
        for value, why in slips:
            if value != expected and answer == value:
                return Result(False, f"{answer:,} is not it: {why}")
    return _check_count(
        answer,
        expected,
        what=f"the rank-{rank} adapter's tensor data",
        unit="bytes",
        why=f"{spec.num_layers} blocks x {len(targets)} layers x r (d_in + d_out) = "
        f"{numbers:,} numbers, at {bytes_per_number} bytes each.",
        hint="q_proj and v_proj are hidden_size x hidden_size here; count A (r x in) and "
        "B (out x r) for each, in every block, then multiply by 2 bytes.",
    )


def data_start(answer, path):
    """Exercise 2: the byte offset where the tensor data of the safetensors file ``path`` begins."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with open(Path(path), "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{str(path)!r} is {len(prefix)} bytes long, too short for safetensors")
    (header_length,) = struct.unpack("<Q", prefix)
    expected = 8 + header_length
    if answer is None:
        return unanswered(
            "read the first 8 bytes as a little-endian unsigned 64-bit integer "
            "(struct.unpack('<Q', ...)): that is the header's length."
        )
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if _is_number(answer) and answer == header_length:
        return Result(
            False,
            f"{answer:,} is the header's length; the data begins after the "
            "8-byte length field too.",
        )
    if _is_number(answer) and answer == 8:
        return Result(False, "byte 8 is where the JSON header begins; the data comes after it.")
    return _check_count(
        answer,
        expected,
        what="the offset of the first tensor byte",
        unit="bytes",
        why=f"8 bytes of length, then {header_length:,} bytes of JSON header, then the tensors.",
        hint="the data begins after the 8-byte length field and the header it announces.",
    )


def ignored_by_strict_false(answer, rank=8):
    """Exercise 3: unexpected keys when an all-linear adapter of the shipped architecture is
    loaded with ``strict=False`` into a model with LoRA on q/k/v/o only."""
    from lora_lab.lora import DEFAULT_TARGETS, apply_lora
    from lora_lab.model import GPT, GPTConfig

    config = GPTConfig()  # the shipped model's architecture
    saved = apply_lora(GPT(config), rank=rank, target_modules="all-linear")
    into = apply_lora(GPT(config), rank=rank, target_modules=DEFAULT_TARGETS)
    state = {k: v for k, v in saved.state_dict().items() if "lora_" in k}
    expected = len(into.load_state_dict(state, strict=False).unexpected_keys)
    per_block = expected // config.n_layer
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if _is_number(answer) and answer == expected // 2:
        return Result(
            False, f"{answer} counts layers; each layer saved two tensors, lora_A and lora_B."
        )
    if _is_number(answer) and answer == per_block:
        return Result(False, f"{answer} is one block; the model has {config.n_layer}.")
    if _is_number(answer) and answer == len(state):
        return Result(False, f"{answer} is every tensor of the file; the q/k/v/o ones do load.")
    return _check_count(
        answer,
        expected,
        what="the number of tensors ignored",
        unit="",
        why=f"gate_proj, up_proj and down_proj of each of {config.n_layer} blocks, each with "
        "lora_A and lora_B: no error, no warning, just dropped.",
        hint="all-linear adds gate/up/down to q/k/v/o in every block (not lm_head); only "
        "the layers the model lacks are unexpected.",
    )


# ----------------------------------------------------------------------------- exercise 4 (code)

PEFT_PREFIX = "base_model.model."


def _peft_cases():
    """(label, base model, LoRA model) triples: small GPTs of the shipped shape, random weights,
    with lora_B drawn at random so every adapter changes the logits."""
    from lora_lab.lora import apply_lora, lora_layers
    from lora_lab.model import GPT, GPTConfig

    cases = []
    for label, targets, rank in (
        ("LoRA on q/k/v/o, rank 4", ["q_proj", "k_proj", "v_proj", "o_proj"], 4),
        ("LoRA on every linear layer, rank 2", "all-linear", 2),
        ("LoRA on block 3's o_proj only, rank 8", ["model.layers.3.self_attn.o_proj"], 8),
    ):
        gen = torch.Generator().manual_seed(len(cases))
        torch.manual_seed(len(cases))
        base = GPT(GPTConfig()).eval()
        lora = apply_lora(copy.deepcopy(base), rank=rank, alpha=2 * rank, target_modules=targets)
        with torch.no_grad():
            for layer in lora_layers(lora).values():
                b = layer.lora_B.weight
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
        cases.append((label, base, lora.eval()))
    return cases


def _first_wrong_key(got, expected):
    """Why the learner's ``{key: tensor}`` is not PEFT's, naming the first wrong key; or None."""
    if not isinstance(got, dict):
        return f"it should return a dict {{key: tensor}}, got {_describe(got, 80)}"
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected), key=str)
    if missing:
        key = missing[0]
        bare = key.removeprefix(PEFT_PREFIX)
        if bare in got:
            why = f"your keys lack PEFT's prefix {PEFT_PREFIX!r} (you have {bare!r})"
        elif any(".default." in str(k) for k in got):
            why = (
                "PEFT's in-memory names carry the adapter's name ('.default.'); the keys in its "
                "file do not"
            )
        else:
            why = "every LoRA layer saves two tensors, lora_A.weight and lora_B.weight"
        return f"key {key!r} is missing ({len(missing)} of {len(expected)} are): {why}"
    if extra:
        key = extra[0]
        if "lora_" not in str(key):
            why = "only lora_A and lora_B weights belong in an adapter; the base stays where it is"
        else:
            why = "the model has no LoRA weight of that name"
        return f"key {key!r} should not be there ({len(extra)} extra): {why}"
    for key in sorted(expected):
        value, right = got[key], expected[key]
        if not isinstance(value, torch.Tensor):
            return f"{key!r} should be a torch.Tensor, got {type(value).__name__}"
        if tuple(value.shape) != tuple(right.shape):
            return (
                f"{key!r} has shape {tuple(value.shape)}, PEFT expects {tuple(right.shape)}: "
                "lora_A is (r, in_features), lora_B is (out_features, r)"
            )
        diff = (value.detach().cpu().double() - right.double()).abs().max().item()
        if not diff == 0:  # also catches NaN
            part = "lora_A" if key.endswith("lora_A.weight") else "lora_B"
            return f"{key!r} differs from the layer's {part}.weight by up to {diff:.3g}"
    return None


def _through_peft(tensors, base, lora, folder):
    """Write ``tensors`` with lora_lab's config, load the folder with PEFT onto ``base``,
    and return (PEFT's logits, the LoRA model's logits) on fixed tokens."""
    import peft
    from safetensors.torch import save_file

    from lora_lab.adapters import adapter_config
    from lora_lab.training import logits_of

    folder = Path(folder)
    with open(folder / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora), f)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(plain, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    tokens = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return logits_of(theirs, tokens), logits_of(lora, tokens)


def peft_state_dict(fn):
    """Exercise 4: the learner's ``fn(lora_model) -> {PEFT key: tensor}``.

    On each of three small LoRA models the result is compared key by key with what PEFT's file
    holds (the first wrong key is named), then written with lora_lab's adapter_config.json and
    loaded by ``peft.PeftModel.from_pretrained``, whose logits must equal the LoRA model's.
    """
    from lora_lab.adapters import adapter_state_dict
    from lora_lab.hub import logits_agree

    what = "peft_state_dict(lora_model)"
    hint = (
        "lora_layers(lora_model) gives every LoRA layer by its full name; section 4 printed the "
        "keys a PEFT file uses for them."
    )
    if fn is None:
        return unanswered(hint)
    if not callable(fn):
        return Result(False, f"{what} should be a function, got {type(fn).__name__} {fn!r}.")
    cases = _peft_cases()
    for i, (label, base, lora) in enumerate(cases, start=1):
        where = f"{what}, case {i} of {len(cases)} ({label})"
        try:
            got = fn(copy.deepcopy(lora))
        except NotImplementedError:
            return unanswered(hint)
        except Exception as error:  # the learner's bug, reported as a case
            return Result(False, f"{where}: raised {type(error).__name__}: {error}")
        problem = _first_wrong_key(got, adapter_state_dict(lora))
        if problem:
            return Result(False, f"{where}: {problem}.")
        with tempfile.TemporaryDirectory() as folder:
            theirs, ours = _through_peft(got, base, lora, folder)
        if not logits_agree(theirs, ours):
            gap = (theirs - ours).abs().max().item()
            return Result(False, f"{where}: PEFT loaded it, but its logits differ by {gap:.3g}.")
    return Result(
        True,
        f"{what} passes all {len(cases)} cases: PEFT loaded each adapter and gave the LoRA "
        "model's logits exactly. That dict, in adapter_model.safetensors beside "
        "adapter_config.json, is an adapter any PEFT user can load.",
    )
