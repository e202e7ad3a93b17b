"""Chapter 7's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here (not with the checkers' own formulas), so a slip
in either shows.
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.checks import ch07 as check

# Llama-2-13B: 40 blocks, hidden 5120; q_proj and v_proj are 5120 x 5120.
NUMBERS_13B = 40 * 2 * 16 * (5120 + 5120)  # 13,107,200 at rank 16
BYTES_13B = 2 * NUMBERS_13B  # bf16


def test_adapter_bytes_13b():
    assert BYTES_13B == 26_214_400
    assert check.adapter_bytes_13b(BYTES_13B).correct
    assert check.adapter_bytes_13b(float(BYTES_13B)).correct
    assert check.adapter_bytes_13b(torch.tensor(BYTES_13B)).correct
    assert check.adapter_bytes_13b(4 * 40 * 2 * 8 * 10240, rank=8, bytes_per_number=4).correct
    assert not check.adapter_bytes_13b(BYTES_13B + 2).correct


@pytest.mark.parametrize(
    "answer, says",
    [(NUMBERS_13B, "bytes per number"), (2 * BYTES_13B, "fp32"), (BYTES_13B // 40, "one block")],
)
def test_adapter_bytes_13b_names_the_slip(answer, says):
    result = check.adapter_bytes_13b(answer)
    assert not result.correct and says in result.message


def test_adapter_bytes_13b_unanswered_and_bad_types():
    result = check.adapter_bytes_13b(None)
    assert not result.correct and "No answer yet" in result.message
    assert not check.adapter_bytes_13b(str(BYTES_13B)).correct
    assert not check.adapter_bytes_13b(True).correct


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16)}
    save_file(tensors, path, metadata={"format": "pt"})
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return path, os.path.getsize(path) - data  # the data is the file's last bytes


def test_data_start(st_file):
    path, start = st_file
    assert start % 8 == 0 and start > 8
    assert check.data_start(start, path).correct
    assert check.data_start(start, str(path)).correct
    assert not check.data_start(start + 1, path).correct
    result = check.data_start(None, path)
    assert not result.correct and "No answer yet" in result.message


def test_data_start_names_the_slip(st_file):
    path, start = st_file
    result = check.data_start(start - 8, path)  # the header length alone
    assert not result.correct and "8-byte length" in result.message
    result = check.data_start(8, path)
    assert not result.correct and "JSON header begins" in result.message


def test_data_start_bad_path(tmp_path):
    with pytest.raises(TypeError, match="path"):
        check.data_start(8, 123)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        check.data_start(8, short)


def test_ignored_by_strict_false():
    # 4 blocks x (gate, up, down) x (lora_A, lora_B)
    assert check.ignored_by_strict_false(24).correct
    assert not check.ignored_by_strict_false(25).correct
    result = check.ignored_by_strict_false(None)
    assert not result.correct and "No answer yet" in result.message


@pytest.mark.parametrize(
    "answer, says", [(12, "two tensors"), (6, "one block"), (56, "every tensor")]
)
def test_ignored_by_strict_false_names_the_slip(answer, says):
    result = check.ignored_by_strict_false(answer)
    assert not result.correct and says in result.message


# Exercise 4 (code): an adapter PEFT can load


def right_state_dict(lora_model):
    from lora_lab.lora import lora_layers

    tensors = {}
    for name, layer in lora_layers(lora_model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return tensors


def test_peft_state_dict_right_answer_passes_through_peft():
    result = check.peft_state_dict(right_state_dict)
    assert result.correct and "all 3 cases" in result.message, result.message


def test_peft_state_dict_unanswered():
    def todo(lora_model):
        raise NotImplementedError

    assert "No answer yet" in check.peft_state_dict(todo).message
    assert "No answer yet" in check.peft_state_dict(None).message
    assert "should be a function" in check.peft_state_dict(3).message


def lesson_filter(lora_model):  # the lesson's keys: no PEFT prefix
    return {k: v for k, v in lora_model.state_dict().items() if "lora_" in k}


def in_memory_names(lora_model):  # PEFT's names inside a PeftModel, with the adapter's name
    return {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in right_state_dict(lora_model).items()
    }


def whole_model(lora_model):  # every weight, base included
    return {f"base_model.model.{k}": v for k, v in lora_model.state_dict().items()}


def swapped(lora_model):  # lora_A's tensor under lora_B's key and back
    out = right_state_dict(lora_model)
    keys = sorted(out)
    return {
        k: out[k.replace("lora_A", "TMP").replace("lora_B", "lora_A").replace("TMP", "lora_B")]
        for k in keys
    }


def b_still_zero(lora_model):  # a fresh lora_B instead of the trained one
    return {
        k: (v.zero_() if k.endswith("lora_B.weight") else v).clone()
        for k, v in right_state_dict(lora_model).items()
    }


def only_attention(lora_model):  # hard-coded q/k/v/o: misses the MLP layers of case 2
    return {k: v for k, v in right_state_dict(lora_model).items() if "self_attn" in k}


@pytest.mark.parametrize(
    "wrong, says",
    [
        (
            lesson_filter,
            "case 1 of 3 (LoRA on q/k/v/o, rank 4): key 'base_model.model.model.layers"
            ".0.self_attn.k_proj.lora_A.weight' is missing",
        ),
        (lesson_filter, "lack PEFT's prefix"),
        (in_memory_names, "('.default.')"),
        (whole_model, "should not be there"),
        (whole_model, "only lora_A and lora_B weights belong"),
        (swapped, "has shape (128, 4), PEFT expects (4, 128)"),
        (b_still_zero, "differs from the layer's lora_B.weight by up to"),
        (
            only_attention,
            "case 2 of 3 (LoRA on every linear layer, rank 2): key "
            "'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' is missing",
        ),
        (lambda m: list(right_state_dict(m).items()), "should return a dict"),
        (lambda m: m.missing_attribute, "raised AttributeError"),
    ],
)
def test_peft_state_dict_names_the_case_and_the_first_wrong_key(wrong, says):
    result = check.peft_state_dict(wrong)
    assert not result.correct and says in result.message, result.message


def test_peft_state_dict_peft_step_catches_what_keys_cannot(monkeypatch):
    """A dict that passes the key check but loads into a model whose logits differ is caught by
    PEFT's logits: here the LoRA model's own logits are perturbed after the key check."""
    from lora_lab.training import logits_of as real_logits_of

    calls = {"n": 0}

    def shifted(model, tokens):
        calls["n"] += 1
        out = real_logits_of(model, tokens)
        return out + 1e-3 if calls["n"] == 2 else out  # the LoRA model's logits, first case

    monkeypatch.setattr("lora_lab.training.logits_of", shifted)
    result = check.peft_state_dict(right_state_dict)
    assert not result.correct and "PEFT loaded it, but its logits differ by 0.001" in result.message
