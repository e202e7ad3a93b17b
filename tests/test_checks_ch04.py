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
