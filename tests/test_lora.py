"""lora_lab.lora checked against PEFT's LoRA on the same weights.

Tolerances: float32 comparisons use atol=rtol=1e-6 unless a test says otherwise. Where both
libraries run the same operations in the same order the outputs are bit-identical, and the
tests say so by asserting exact equality.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import math
import re

import peft
import pytest
import torch
import torch.nn as nn
import transformers
from peft.tuners.lora import LoraLayer

from lora_lab.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    find_target_modules,
    lora_layers,
    merge_lora,
)

F32 = {"atol": 1e-6, "rtol": 1e-6}  # float32: about 8 ulps of an O(1) number


# ----------------------------------------------------------------------------- models


def tiny_llama(seed=0, **overrides):
    """A 2-layer LlamaForCausalLM built from a config: random weights, no download."""
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k_proj, v_proj: (16, 32)
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


class TinyNet(nn.Module):
    """A plain torch module: two linear blocks, a norm, a non-linear module named like a target."""

    def __init__(self, with_head=True):
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("fc1", nn.Linear(12, 20))
        self.encoder.add_module("act", nn.GELU())
        self.encoder.add_module("fc2", nn.Linear(20, 12))
        self.norm = nn.LayerNorm(12)
        self.gate = nn.ReLU()  # not linear: targeting it must fail
        self.lm_head = nn.Linear(12, 7) if with_head else None

    def forward(self, x):  # x: (..., 12)
        h = self.norm(self.encoder(x))
        return self.lm_head(h) if self.lm_head is not None else h


def randomize_lora(model, seed=1):
    """Give every LoRA A and B random values (B starts at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def peft_to_ours_key(key):
    """PEFT's in-memory key -> lora_lab's in-memory key for the same tensor."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def copy_peft_weights_into(ours, theirs):
    """Copy every tensor of a PEFT model into the lora_lab model with the same layout."""
    ours_sd = ours.state_dict()
    theirs_sd = {peft_to_ours_key(k): v for k, v in theirs.state_dict().items()}
    assert set(ours_sd) == set(theirs_sd)
    ours.load_state_dict(theirs_sd, strict=True)


def peft_lora_names(peft_model):
    inner = peft_model.base_model.model
    return sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))


def ids(batch=2, seq=9, vocab=64, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the layer


def single_layer_pair(in_f=24, out_f=40, rank=4, alpha=8, dropout=0.0, use_rslora=False):
    """The same nn.Linear wrapped by lora_lab and by PEFT."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(in_f, out_f))
    ours = LoRALinear(copy.deepcopy(net.proj), rank, alpha, dropout, use_rslora)
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=["proj"],
    )
    theirs = peft.get_peft_model(net, cfg).base_model.model.proj
    with torch.no_grad():
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
    return ours, theirs


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24)])
def test_layer_equals_peft_at_init_and_after_training_values(shape, use_rslora):
    ours, theirs = single_layer_pair(use_rslora=use_rslora)
    x = torch.randn(shape)
    # at init B = 0: both are exactly the base layer
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours(x), ours.base_layer(x))
    # with the same non-zero A and B: same operations in the same order -> bit-identical
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    with torch.no_grad():
        for lA, lB in (
            (ours.lora_A, ours.lora_B),
            (theirs.lora_A["default"], theirs.lora_B["default"]),
        ):
            lA.weight.copy_(A)
            lB.weight.copy_(B)
    y = ours(x)
    assert y.shape == (*shape[:-1], 40)
    assert torch.equal(y, theirs(x))
    expected = ours.base_layer(x) + ours.scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(y, expected, **F32)


def test_same_seed_gives_peft_init():
    """A is drawn as PEFT draws it (Kaiming-uniform, a=sqrt(5)), so one seed gives one A."""
    ours, theirs = tiny_llama(), tiny_llama()
    torch.manual_seed(7)
    apply_lora(ours, rank=4, alpha=8, target_modules="all-linear")
    torch.manual_seed(7)
    theirs = peft.get_peft_model(
        theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    theirs_sd = {peft_to_ours_key(k): v for k, v in theirs.state_dict().items()}
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_sd[key]), key
    layer = lora_layers(ours)["model.layers.0.self_attn.q_proj"]
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.8 * bound  # spread over the range, not zeros
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("rank,alpha", [(1, 8), (4, 16), (16, 16), (8, 3.5)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_equals_peft(rank, alpha, use_rslora):
    ours, theirs = single_layer_pair(rank=rank, alpha=alpha, use_rslora=use_rslora)
    assert ours.scaling == theirs.scaling["default"]
    expected = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    assert ours.scaling == expected


def test_dropout_matches_peft_in_train_mode_and_is_off_in_eval():
    ours, theirs = single_layer_pair(dropout=0.5)
    assert isinstance(ours.lora_dropout, nn.Dropout) and ours.lora_dropout.p == 0.5
    with torch.no_grad():
        for lB in (ours.lora_B, theirs.lora_B["default"]):
            lB.weight.fill_(0.3)
    x = torch.randn(64, 24)
    ours.train()
    theirs.train()
    dropped = []
    ours.lora_dropout.register_forward_hook(lambda mod, inp, out: dropped.append(out))
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    assert torch.equal(y_ours, y_theirs)  # same RNG draws -> same dropout mask
    torch.manual_seed(12)
    assert not torch.equal(ours(x), y_ours)  # a new mask each call
    # inverted dropout on the LoRA input only: each entry is 0 or x / (1 - p)
    kept = dropped[0] != 0
    assert torch.equal(dropped[0][kept], x[kept] * 2.0)
    assert 0.45 < kept.float().mean() < 0.55  # 1536 draws: std of the share is 0.013
    lora_part = y_ours - ours.base_layer(x)  # the base output is not dropped
    expected = ours.scaling * ours.lora_B(ours.lora_A(dropped[0]))
    torch.testing.assert_close(lora_part, expected, atol=1e-5, rtol=1e-5)  # y - base: O(10)
    ours.eval()
    theirs.eval()
    y_eval = ours(x)
    assert torch.equal(y_eval, ours(x))  # deterministic
    assert torch.equal(y_eval, theirs(x))
    assert isinstance(LoRALinear(nn.Linear(4, 4), rank=2, dropout=0.0).lora_dropout, nn.Identity)


def test_dtypes_and_devices_follow_the_base():
    """Adapters take the base's dtype, except on a 16-bit base: float32 there, as in PEFT."""
    for dtype, adapter in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                           (torch.float16, torch.float32)):  # fmt: skip
        base = nn.Linear(16, 8, dtype=dtype)
        layer = LoRALinear(base, rank=2, alpha=4)
        assert layer.base_layer.weight.dtype == dtype
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            assert p.dtype == adapter and p.device == base.weight.device
        x = torch.randn(3, 16, dtype=dtype)
        assert layer(x).dtype == dtype  # the output keeps the base's dtype
        asked = LoRALinear(base, rank=2, alpha=4, adapter_dtype=dtype)
        assert asked.lora_A.weight.dtype == asked.lora_B.weight.dtype == dtype
    with pytest.raises(TypeError, match="adapter_dtype must be None or a floating"):
        LoRALinear(nn.Linear(4, 4), rank=2, adapter_dtype=torch.int8)
    with pytest.raises(TypeError, match="adapter_dtype must be None or a floating"):
        apply_lora(
            nn.Sequential(nn.Linear(4, 4)), rank=2, target_modules=["0"], adapter_dtype="fp32"
        )
    base = nn.Linear(16, 8, dtype=torch.float64)
    layer = LoRALinear(base, rank=2, alpha=4)
    randomize_lora(layer)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ A.T @ B.T, atol=1e-12, rtol=1e-12)


def test_layer_attributes_and_freezing():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, rank=3, alpha=6)
    assert layer.base_layer is base and layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (10, 6, 3, 6)
    assert layer.lora_A.weight.shape == (3, 10) and layer.lora_B.weight.shape == (6, 3)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert sorted(layer.state_dict()) == [
        "base_layer.bias",
        "base_layer.weight",
        "lora_A.weight",
        "lora_B.weight",
    ]
    assert "rank=3" in repr(layer) and "scaling=2" in repr(layer)


def test_merge_unmerge_and_merge_twice_raises():
    layer = LoRALinear(nn.Linear(32, 24), rank=4, alpha=8)
    randomize_lora(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(7, 32)
    y = layer(x)
    delta = layer.delta_weight()
    assert delta.shape == (24, 32)
    torch.testing.assert_close(delta, 2.0 * layer.lora_B.weight @ layer.lora_A.weight, **F32)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, **F32)
    torch.testing.assert_close(layer(x), y, **F32)  # no double counting of the update
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, **F32)
    torch.testing.assert_close(layer(x), y, **F32)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


# ----------------------------------------------------------------------------- injection

TARGET_SPECS = [
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ["gate_proj", "up_proj", "down_proj"],
    ["layers.0.self_attn.q_proj"],  # a longer suffix selects one layer only
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj",  # a regex must match the full name
    "all-linear",
]


@pytest.mark.parametrize("targets", TARGET_SPECS, ids=str)
def test_llama_same_layers_counts_and_outputs_as_peft(targets):
    ours, theirs = tiny_llama(), tiny_llama()
    apply_lora(ours, rank=4, alpha=8, target_modules=targets)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert sorted(lora_layers(ours)) == peft_lora_names(theirs)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    x = ids()
    assert torch.equal(ours(x).logits, theirs(x).logits)  # B = 0: both are the base model
    randomize_lora(theirs, seed=2)
    copy_peft_weights_into(ours, theirs)
    base_logits = tiny_llama()(x).logits
    y = ours(x).logits
    assert (y - base_logits).abs().max() > 1e-2  # the update really changes the output
    assert torch.equal(y, theirs(x).logits)  # same operations in the same order: bit-identical


def test_all_linear_leaves_the_output_head_alone():
    model = apply_lora(tiny_llama(), target_modules="all-linear")
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert len(lora_layers(model)) == 2 * 7
    net = apply_lora(TinyNet(), rank=2, target_modules="all-linear")
    assert sorted(lora_layers(net)) == ["encoder.fc1", "encoder.fc2"]  # lm_head skipped
    # a plain module without a head: every linear layer, as PEFT does
    ours, theirs = TinyNet(with_head=False), TinyNet(with_head=False)
    apply_lora(ours, rank=2, target_modules="all-linear")
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(lora_layers(ours)) == peft_lora_names(theirs) == ["encoder.fc1", "encoder.fc2"]


def test_plain_module_matches_peft():
    torch.manual_seed(0)
    ours = TinyNet()
    theirs = copy.deepcopy(ours)
    apply_lora(ours, rank=3, alpha=5, target_modules=["fc1", "lm_head"])
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "lm_head"])
    theirs = peft.get_peft_model(theirs, cfg)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    randomize_lora(theirs)
    copy_peft_weights_into(ours, theirs)
    x = torch.randn(4, 6, 12)
    assert torch.equal(ours(x), theirs(x))  # bit-identical, as above


def test_apply_lora_freezes_everything_else_and_counts():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    assert apply_lora(model, rank=4) is model
    trainable, total_after = count_parameters(model)
    # q, o: (32 -> 32); k, v: (32 -> 16); per layer 4 * 4 * 32 + 4 * (32 + 16 + 16 + 32)
    per_layer = 4 * (4 * 32) + 4 * (32 + 16 + 16 + 32)
    assert trainable == 2 * per_layer
    assert total_after == total + trainable
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_A" in name or "lora_B" in name), name


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == (sum(unique.values()), sum(unique.values()))
    theirs = peft.get_peft_model(
        tiny_llama(tie_word_embeddings=True), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    assert (
        count_parameters(apply_lora(model, rank=2, target_modules=["q_proj"]))
        == theirs.get_nb_trainable_parameters()
    )


def test_gradients_reach_only_lora_weights():
    model = apply_lora(tiny_llama(), rank=4, target_modules="all-linear")
    x = ids()
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # B starts at zero, so A's first gradient is exactly zero and B's is not
    q = lora_layers(model)["model.layers.1.self_attn.q_proj"]
    assert torch.count_nonzero(q.lora_A.weight.grad) == 0
    assert q.lora_B.weight.grad.abs().max() > 0


def test_merge_lora_restores_plain_linear_and_keeps_outputs():
    torch.manual_seed(0)
    model = tiny_llama()
    plain_keys = sorted(model.state_dict())
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    randomize_lora(theirs)
    copy_peft_weights_into(model, theirs)
    x = ids()
    before = model(x).logits
    assert merge_lora(model) is model
    assert not lora_layers(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and not q.weight.requires_grad
    assert sorted(model.state_dict()) == plain_keys  # a plain model again
    # merged logits equal unmerged ones to float32 rounding (2 decoder layers of O(1) values)
    torch.testing.assert_close(model(x).logits, before, **F32)
    merged_theirs = theirs.merge_and_unload()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, merged_theirs.state_dict()[key], **F32)
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_lora(model)


def test_merge_lora_on_a_single_layer_returns_the_linear():
    layer = LoRALinear(nn.Linear(8, 8), rank=2)
    randomize_lora(layer)
    x = torch.randn(3, 8)
    y = layer(x)
    plain = merge_lora(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), y, **F32)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "8", None])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=rf"rank must be a positive integer, got {rank!r}"):
        LoRALinear(nn.Linear(8, 8), rank=rank)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        apply_lora(tiny_llama(), rank=rank)


def test_rank_larger_than_the_layer():
    with pytest.raises(ValueError, match=r"rank must be at most .*min\(32, 16\) = 16.*got 17"):
        LoRALinear(nn.Linear(32, 16), rank=17)
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    # q_proj (32x32) could take rank 20, k_proj (16 out) cannot: nothing may change
    with pytest.raises(ValueError, match=r"got 20 \(layer 'model.layers.0.self_attn.k_proj'\)"):
        apply_lora(model, rank=20)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("alpha", [0, -2, float("nan"), float("inf"), True, "16"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=rf"alpha must be a finite number > 0, got {alpha!r}"):
        LoRALinear(nn.Linear(8, 8), rank=2, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, True, "0.1"])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=rf"dropout must be a number in \[0, 1\), got {dropout!r}"):
        apply_lora(tiny_llama(), dropout=dropout)


def test_bad_use_rslora_and_base():
    with pytest.raises(TypeError, match="use_rslora must be True or False, got 'yes'"):
        LoRALinear(nn.Linear(8, 8), rank=2, use_rslora="yes")
    with pytest.raises(
        TypeError, match="base must be a torch.nn.Linear or a transformers Conv1D, got Conv1d"
    ):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=2)
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(8, 8), rank=2), rank=2)
    quantized = nn.Linear(8, 8)
    quantized.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point.*torch.int8"):
        LoRALinear(quantized, rank=2)


def test_targets_that_match_nothing_list_the_linear_layers():
    with pytest.raises(ValueError, match="matched no module") as err:
        apply_lora(tiny_llama(), target_modules=["query", "value"])
    message = str(err.value)
    assert "['query', 'value']" in message or "('query', 'value')" in message
    assert "model.layers.0.self_attn.q_proj" in message and "lm_head" in message
    # a suffix is a whole dotted part of the name, as in PEFT: "proj" is not "q_proj"
    with pytest.raises(ValueError, match=r"\['proj'\] matched no module"):
        apply_lora(tiny_llama(), target_modules=["proj"])
    with pytest.raises(ValueError, match=r"'q_pro' matched no module.*encoder.fc1"):
        apply_lora(TinyNet(), target_modules="q_pro")


def test_target_that_is_not_linear():
    with pytest.raises(
        TypeError, match=r"matched 'gate', a ReLU; LoRALinear wraps torch.nn.Linear"
    ):
        apply_lora(TinyNet(), rank=2, target_modules=["gate"])
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn', a LlamaAttention"):
        apply_lora(tiny_llama(), target_modules=["self_attn"])


@pytest.mark.parametrize("targets", [[], 3, [1], [""], None])
def test_bad_target_modules_type(targets):
    with pytest.raises(
        TypeError, match=rf"target_modules must be .*got {re.escape(repr(targets))}"
    ):
        apply_lora(tiny_llama(), target_modules=targets)


def test_bad_regex():
    with pytest.raises(ValueError, match=r"target_modules '\(q_proj' is not a valid regular"):
        apply_lora(tiny_llama(), target_modules="(q_proj")


@pytest.mark.parametrize("second", [("q_proj",), "all-linear", r".*q_proj"])
def test_applying_twice_to_a_wrapped_layer_raises(second):
    model = apply_lora(tiny_llama(), rank=2, target_modules=["q_proj"])
    with pytest.raises(
        ValueError, match=r"matched 'model.layers.0.self_attn.q_proj', which already has LoRA"
    ):
        apply_lora(model, rank=2, target_modules=second)
    assert not isinstance(model.model.layers[0].self_attn.q_proj.base_layer, LoRALinear)


def test_a_second_call_may_target_other_layers():
    model = apply_lora(tiny_llama(), rank=2, target_modules=["q_proj"])
    apply_lora(model, rank=2, target_modules=["v_proj"])
    names = sorted(lora_layers(model))
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert find_target_modules(model, ["k_proj"]) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.k_proj",
    ]


def test_non_module_arguments():
    for fn in (apply_lora, count_parameters, merge_lora, lora_layers):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
            fn({})
