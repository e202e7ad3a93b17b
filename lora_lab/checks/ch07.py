"""Checkers for chapter 7, "Saving, loading, swapping"."""

import os
import struct
from pathlib import Path

import torch

from lora_lab.checks import Result, unanswered


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
