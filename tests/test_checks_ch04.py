"""Chapter 4's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand from the architectures' published numbers, not with the
code the checkers use, so a slip in either shows.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn as nn

from lora_lab.checks import ch04 as check
from lora_lab.model import GPT, GPTConfig


def test_mistral_attention_lora():
    # 32 blocks; q, o: 4096 -> 4096; k, v: 4096 -> 1024 (8 KV heads of 128)
    by_hand = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    assert by_hand == 13_631_488
    result = check.mistral_attention_lora(by_hand)
    assert result.correct and "13,631,488" in result.message
    assert check.mistral_attention_lora(float(by_hand)).correct
    assert check.mistral_attention_lora(32 * 8 * 26_624, rank=8).correct
    assert not check.mistral_attention_lora(by_hand + 1).correct
    assert not check.mistral_attention_lora(None).correct
    assert not check.mistral_attention_lora("13631488").correct


@pytest.mark.parametrize(
    "answer, says",
    [(32 * 16 * 4 * 8192, "grouped-query"), (16 * 26_624, "one block")],
)
def test_mistral_attention_lora_names_the_slip(answer, says):
    result = check.mistral_attention_lora(answer)
    assert not result.correct and says in result.message


def mlp_share_by_hand(config, rank=8):
    """(LoRA, all) parameters of a GPT with LoRA on its three MLP layers, from the config."""
    V, d, f, L = config.vocab_size, config.n_embd, config.intermediate_size, config.n_layer
    base = 2 * V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d  # embed, head, blocks, final norm
    lora = L * 3 * rank * (d + f)
    return lora, base + lora


def test_mlp_share_logic(monkeypatch):
    """The checker's logic on a small GPT of our own (the shipped model comes next)."""
    config = GPTConfig(n_layer=2, n_embd=64, n_head=2, intermediate_size=160)
    monkeypatch.setattr(check, "shipped_model", lambda: GPT(config))
    lora, total = mlp_share_by_hand(config)
    assert check.mlp_share(lora / total).correct
    assert not check.mlp_share(lora / total * 1.01).correct
    assert not check.mlp_share(None).correct
    percent = check.mlp_share(100 * lora / total)
    assert not percent.correct and "percentage" in percent.message
    base_only = check.mlp_share(lora / (total - lora))
    assert not base_only.correct and "adapters" in base_only.message


def test_mlp_share_on_the_shipped_model():
    config = check.shipped_model().config
    lora, total = mlp_share_by_hand(config)
    assert check.mlp_share(lora / total).correct
    assert not check.mlp_share(lora / total * 1.01).correct


def test_phi3_names_are_transformers_names():
    """The checker's list of Phi-3 layer names is what transformers builds (on meta: no memory)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    with torch.device("meta"):
        phi3 = Phi3ForCausalLM(Phi3Config())
    names = sorted(n for n, m in phi3.named_modules() if isinstance(m, nn.Linear))
    assert names == sorted(check._phi3_linear_names())


def test_rules_differ():
    # v_proj is inside qkv_proj, up_proj inside gate_up_proj, proj inside every name;
    # o_proj and down_proj are whole names wherever they occur.
    assert check.rules_differ(["b", "c", "e"]).correct
    assert check.rules_differ(["e", "B", "c"]).correct
    assert check.rules_differ(("b", "c", "e")).correct
    missed = check.rules_differ(["b", "c"])
    assert not missed.correct and "['e']" in missed.message
    extra = check.rules_differ(["a", "b", "c", "e"])
    assert not extra.correct and "['a']" in extra.message
    assert not check.rules_differ(None).correct
    assert not check.rules_differ("bce").correct
    assert not check.rules_differ(3).correct
    unknown = check.rules_differ(["b", "z"])
    assert not unknown.correct and "'z'" in unknown.message


def test_mlp_share_names_the_course_definition(monkeypatch):
    config = GPTConfig(n_layer=2, n_embd=64, n_head=2, intermediate_size=160)
    monkeypatch.setattr(check, "shipped_model", lambda: GPT(config))
    lora, total = mlp_share_by_hand(config)
    assert "PEFT" in check.mlp_share(lora / total).message
    base_only = check.mlp_share(lora / (total - lora))
    assert "trainable / (base + adapters)" in base_only.message


def right_matcher(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def test_suffix_matcher_right_answers_pass():
    result = check.suffix_matcher(right_matcher)
    assert result.correct and f"all {len(check.MATCH_CASES)} cases" in result.message
    # lora_lab's own matcher (the one apply_lora uses) agrees with every case
    from lora_lab.lora import target_matches

    assert check.suffix_matcher(lambda name, targets: target_matches(name, targets)).correct
    for _, name, targets, selected in check.MATCH_CASES:
        assert target_matches(name, targets) is selected, name


@pytest.mark.parametrize(
    "wrong, case, says",
    [
        (lambda name, targets: any(t in name for t in targets), 5, "qkv_proj"),  # the lesson's
        (lambda name, targets: any(name.endswith(t) for t in targets), 5, "qkv_proj"),  # no dot
        (lambda name, targets: name.split(".")[-1] in targets, 8, "attn.c_proj"),  # last part
        (lambda name, targets: name in targets, 2, "self_attn.q_proj"),  # whole names only
        (lambda name, targets: any(t in name.split(".") for t in targets), 8, "attn.c_proj"),
    ],
)
def test_suffix_matcher_wrong_answers_name_the_case(wrong, case, says):
    result = check.suffix_matcher(wrong)
    assert not result.correct
    assert f"case {case} of {len(check.MATCH_CASES)}" in result.message and says in result.message
    assert "Expected" in result.message and "got" in result.message


def test_suffix_matcher_unanswered_and_broken():
    def todo(name, targets):
        raise NotImplementedError

    assert "No answer yet" in check.suffix_matcher(todo).message
    assert "No answer yet" in check.suffix_matcher(None).message
    boom = check.suffix_matcher(lambda name, targets: name.endswith("." + targets))
    assert not boom.correct and "raised TypeError" in boom.message and "case 1" in boom.message


def test_suffix_matcher_cases_use_real_names():
    """The cases' Phi-3 names are the layers transformers builds; the Llama-style ones are the
    shipped model's; the GPT-2 ones are GPT-2's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    phi3 = set(check._phi3_linear_names())
    shipped = {n for n, _ in check.shipped_model().named_modules()}
    with torch.device("meta"):
        gpt2 = {n for n, _ in GPT2LMHeadModel(GPT2Config(n_layer=1)).named_modules()}
    names = [name for _, name, _, _ in check.MATCH_CASES if not name.endswith(".lora_A")]
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.2.mlp.gate_up_proj"} <= phi3
    assert all(n in phi3 | shipped | gpt2 for n in names), [
        n for n in names if n not in phi3 | shipped | gpt2
    ]
