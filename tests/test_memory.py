"""Tests of lora_lab.specs, estimate, measure and widgets: counts against transformers, bytes against measurement."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402

import bitsandbytes  # noqa: E402  required packages: a broken install fails, never skips
import bitsandbytes.functional as bnb_f  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import lora_lab.lora as lora_mod  # noqa: E402
import lora_lab.model as model_mod  # noqa: E402
from lora_lab.estimate import (  # noqa: E402
    GB,
    activation_bytes,
    estimate_memory,
    lesson_table,
    nf4_bytes,
    optimizer_state_bytes,
)
from lora_lab.measure import measure_activation_bytes, measure_state_bytes  # noqa: E402
from lora_lab.specs import PRESETS, ModelSpec  # noqa: E402
from lora_lab.widgets import memory_calculator  # noqa: E402

# The published configurations, typed from each model's config.json (not from lora_lab).
LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096)
PUBLISHED = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, **LLAMA2)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40, **LLAMA2)),
    "llama-2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, **LLAMA2)),
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, max_position_embeddings=32768)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=32768)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25)),
}  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def published_config(preset):
    family, kwargs = PUBLISHED[preset]
    return getattr(transformers, FAMILIES[family][0])(**kwargs)


def meta_model(config):
    """The transformers model for ``config`` on the meta device: shapes only, no memory."""
    family = FAMILIES[config.model_type][1]
    with torch.device("meta"):
        return getattr(transformers, family)(config)


def tiny_llama(num_kv_heads=4, attn="sdpa", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return config, transformers.LlamaForCausalLM(config).to(dtype).train()


def peft_lora(model, rank=4, targets=QKVO, dropout=0.0):
    targets = targets if isinstance(targets, str) else list(targets)
    config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, lora_dropout=dropout)
    return peft.get_peft_model(model, config)


def one_step(model, optimizer, loss):
    loss.backward()
    optimizer.step()
    return measure_state_bytes(model, optimizer)


def hf_loss(model, x):
    return lambda: model(input_ids=x, labels=x).loss


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_counts_equal_transformers(preset):
    """Every tensor's name and shape, and the total, equal transformers' model on meta."""
    config = published_config(preset)
    model = meta_model(config)
    spec = PRESETS[preset]
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert spec.parameter_shapes() == actual
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())
    from_config = ModelSpec.from_config(config)
    assert from_config.parameter_shapes() == actual
    assert from_config.linear_layers() == spec.linear_layers()


def test_published_totals():
    """The well-known totals, as a readable cross-check of the presets."""
    counts = {name: spec.num_parameters() for name, spec in PRESETS.items()}
    assert counts["llama-2-7b"] == 6_738_415_616
    assert counts["llama-2-70b"] == 68_976_648_192
    assert counts["mistral-7b"] == 7_241_732_096
    assert counts["gpt2"] == 124_439_808
    assert counts["gpt2-xl"] == 1_557_611_200


def test_lora_count_equals_peft_on_meta():
    """LoRA's trainable count for Llama-2-7B, rank 8 on q/k/v/o, equals PEFT's."""
    model = meta_model(published_config("llama-2-7b"))
    with torch.device("meta"):
        peft_model = peft_lora(model, rank=8)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert PRESETS["llama-2-7b"].lora_parameters(8, QKVO) == trainable == 8_388_608


def test_gpt2_lora_count_and_all_linear():
    spec = PRESETS["gpt2"]
    d, layers = 768, 12
    assert spec.lora_parameters(4) == layers * 4 * ((d + 3 * d) + (d + d))  # c_attn, c_proj
    assert spec.lora_parameters(4, "all-linear") == layers * 4 * (4 * d + 2 * d + 5 * d + 5 * d)


def test_lora_lab_gpt_counts():
    config = model_mod.GPTConfig(n_layer=2, n_embd=64, n_head=4, intermediate_size=160)
    gpt = model_mod.GPT(config)
    spec = ModelSpec.from_config(config)
    assert spec.parameter_shapes() == {n: tuple(p.shape) for n, p in gpt.named_parameters()}
    assert spec.num_parameters() == sum(p.numel() for p in gpt.parameters())


def test_from_config_dict_and_spec_roundtrip():
    config = published_config("mistral-7b")
    assert ModelSpec.from_config(config.to_dict()).parameter_shapes() == (
        PRESETS["mistral-7b"].parameter_shapes()
    )
    assert ModelSpec.from_config("gpt2") is PRESETS["gpt2"]


def test_parameter_table_sums_to_total():
    df = PRESETS["llama-2-70b"].parameter_table()
    assert df["parameters"].sum() == PRESETS["llama-2-70b"].num_parameters()
    row = df.set_index("tensor").loc["layers.*.self_attn.k_proj.weight"]
    assert row["shape"] == (1024, 8192) and row["count"] == 80  # GQA: 8 heads of 128


# ----------------------------------------------------------------------------- the lesson


def test_lesson_table_7e9_exact():
    table = lesson_table(7e9)
    assert table["FP32 (GB)"].tolist() == [28.0, 28.0, 56.0, 112.0]
    assert table["FP16 (GB)"].tolist() == [14.0, 14.0, 28.0, 56.0]


def test_lesson_table_mixed_precision_is_not_half():
    """Real fp16 training keeps fp32 master weights and Adam states: 16 bytes per parameter."""
    table = lesson_table(7e9, convention="mixed")
    assert table.loc["fp32 master weights", "FP16 (GB)"] == 28.0
    assert table.loc["Total", "FP16 (GB)"] == table.loc["Total", "FP32 (GB)"] == 112.0


def test_lesson_table_from_llama_config():
    """From the real config: 16 and 8 bytes per parameter, plus AdamW's 4-byte step tensors."""
    model = meta_model(published_config("llama-2-7b"))
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    table = lesson_table(published_config("llama-2-7b"))
    for column, b in (("FP32 (GB)", 4), ("FP16 (GB)", 2)):
        expected = [n * b, n * b, 2 * n * b + 4 * tensors]
        expected.append(sum(expected))
        assert table[column].tolist() == [x / GB for x in expected]


def test_estimate_7b_components():
    n = 6_738_415_616
    lesson = estimate_memory(
        "llama-2-7b", "full", precision="fp16", convention="lesson", activations=False
    )
    mixed = estimate_memory(
        "llama-2-7b", "full", precision="bf16", convention="mixed", activations=False
    )
    assert (lesson.weights, lesson.gradients, lesson.master_weights) == (2 * n, 2 * n, 0)
    assert (mixed.weights, mixed.gradients, mixed.master_weights) == (2 * n, 2 * n, 4 * n)
    assert mixed.optimizer_states == 8 * n + 4 * 291  # 291 tensors, each with a step
    lora = estimate_memory("llama-2-7b", "lora", precision="fp16", activations=False)
    assert lora.weights == 2 * n and lora.trainable_parameters == 8_388_608
    assert lora.gradients == 4 * 8_388_608  # fp32 adapters under "mixed"
    qlora = estimate_memory("llama-2-7b", "qlora", precision="bf16", activations=False)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    other = n - linear
    bits = (qlora.weights - 2 * other) * 8 / linear
    assert 4.127 < bits < 4.128  # NF4 with double quantization


# ----------------------------------------------------------------------------- bytes per tensor


@pytest.mark.parametrize("shape", [(256, 320), (7, 9), (64, 16384), (1000, 333)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_bitsandbytes(shape, double_quant):
    weight = torch.randn(shape)
    packed, state = bnb_f.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )

    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    assert nf4_bytes(math.prod(shape), 64, double_quant) == measured


def test_optimizer_state_bytes_rules():
    assert optimizer_state_bytes([10, 20], "adamw", 4) == 2 * 30 * 4 + 2 * 4
    assert optimizer_state_bytes([10, 20], "sgd_momentum", 2) == 60
    assert optimizer_state_bytes([10, 20], "sgd", 4) == 0
    assert optimizer_state_bytes([4095], "adamw_8bit", 4) == 8 * 4095  # small: fp32 states
    assert optimizer_state_bytes([4096, 513], "adamw_8bit", 2) == (
        2 * 4096 + 8 * 16 + 8 * 513 + 2048
    )


# ----------------------------------------------------------------------------- vs measurement


def test_full_adamw_state_bytes_exact():
    config, model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 96, (2, 16))
    measured = one_step(model, optimizer, hf_loss(model, x)())
    est = estimate_memory(config, "full", precision="fp32", optimizer="adamw")
    assert measured["params"] == est.weights
    assert measured["grads"] == est.gradients
    assert measured["optimizer"] == est.optimizer_states  # including 4-byte step tensors


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_8bit"])
def test_other_optimizers_state_bytes_exact(optimizer):
    config, model = tiny_llama(num_kv_heads=2)
    if optimizer == "adamw_8bit":
        opt = bitsandbytes.optim.AdamW8bit(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    measured = one_step(model, opt, hf_loss(model, torch.randint(0, 96, (2, 16)))())
    assert (
        measured["optimizer"]
        == estimate_memory(config, "full", precision="fp32", optimizer=optimizer).optimizer_states
    )


def test_pure_bf16_matches_lesson_convention():
    """A bf16 model with torch's AdamW keeps everything in bf16: the lesson's convention."""
    config, model = tiny_llama(dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    measured = one_step(model, optimizer, hf_loss(model, torch.randint(0, 96, (2, 16)))())
    est = estimate_memory(config, "full", precision="bf16", convention="lesson")
    assert (measured["params"], measured["grads"], measured["optimizer"]) == (
        est.weights,
        est.gradients,
        est.optimizer_states,
    )


def test_peft_lora_state_bytes_exact():
    config, model = tiny_llama()
    model = peft_lora(model, rank=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured = one_step(model, optimizer, hf_loss(model, torch.randint(0, 96, (2, 16)))())
    est = estimate_memory(config, "lora", precision="fp32", rank=4)
    assert measured["params"] == est.weights + est.adapter
    assert measured["grads"] == est.gradients
    assert measured["optimizer"] == est.optimizer_states


def test_qlora_state_and_activation_bytes_exact():
    """bitsandbytes NF4 layers (double quantization) with PEFT LoRA on top, on the CPU."""
    bnb = bitsandbytes
    config, model = tiny_llama(num_kv_heads=2)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=False,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                module.weight.data,
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
                blocksize=64,
            )
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    model = peft_lora(model, rank=4)
    x = torch.randint(0, 96, (2, 32))
    act, loss = measure_activation_bytes(model, hf_loss(model, x))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured = one_step(model, optimizer, loss)
    est = estimate_memory(config, "qlora", precision="fp32", rank=4, batch_size=2, seq_len=32)
    assert measured["params"] == est.weights + est.adapter
    assert measured["grads"] == est.gradients
    assert measured["optimizer"] == est.optimizer_states
    assert act == est.activations


ACTIVATION_CASES = [  # attention, kv heads, dtype, method, targets, dropout
    ("sdpa", 4, torch.float32, "full", None, 0.0),
    ("sdpa", 2, torch.bfloat16, "full", None, 0.0),
    ("eager", 2, torch.bfloat16, "full", None, 0.0),
    ("sdpa", 4, torch.float32, "lora", QKVO, 0.0),
    ("eager", 4, torch.bfloat16, "lora", QKVO, 0.0),
    ("sdpa", 2, torch.float32, "lora", "all-linear", 0.1),
    ("eager", 4, torch.bfloat16, "lora", ("v_proj", "down_proj"), 0.0),
    ("sdpa", 4, torch.float32, "lora", ("up_proj",), 0.0),
]


@pytest.mark.parametrize("attn,kv,dtype,method,targets,dropout", ACTIVATION_CASES)
def test_activation_bytes_exact_on_transformers_llama(attn, kv, dtype, method, targets, dropout):
    """Every byte autograd saves, predicted: fp32 and bf16, flash and eager, GQA, PEFT LoRA."""
    config, model = tiny_llama(kv, attn, dtype)
    kwargs = {}
    if method == "lora":
        model = peft_lora(model, 4, targets, dropout)
        # PEFT keeps adapters in fp32; on the CPU torch's dropout mask is a float tensor
        kwargs = dict(
            rank=4,
            target_modules=targets,
            lora_dropout=dropout,
            adapter_precision="fp32",
            dropout_mask_bytes=4,
        )
    x = torch.randint(0, 96, (2, 32))
    measured, _ = measure_activation_bytes(model, hf_loss(model, x))
    precision = "fp32" if dtype == torch.float32 else "bf16"
    attention = "flash" if attn == "sdpa" else "eager"
    est = activation_bytes(
        config, method, precision=precision, batch_size=2, seq_len=32, attention=attention, **kwargs
    )
    assert measured == sum(est.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_lora_lab_gpt_measured_exact(method):
    """lora_lab's GPT: states exact; activations exact but for RoPE's tables (its buffers)."""
    torch.manual_seed(0)
    config = model_mod.GPTConfig(
        n_layer=2, n_embd=64, n_head=4, intermediate_size=160, block_size=32
    )
    model = model_mod.GPT(config).train()
    kwargs = {}
    if method == "lora":
        lora_mod.apply_lora(model, rank=4)
        kwargs = {"rank": 4}
    x, y = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))
    act, loss = measure_activation_bytes(
        model, lambda: F.cross_entropy(model(x).view(-1, 96), y.view(-1))
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured = one_step(model, optimizer, loss)
    est = estimate_memory(config, method, precision="fp32", batch_size=2, seq_len=32, **kwargs)
    assert measured["params"] == est.weights + est.adapter
    assert measured["grads"] == est.gradients
    assert measured["optimizer"] == est.optimizer_states
    assert act == est.activations - est.activation_parts["rope"]


def test_activation_formula_closed_form():
    """The docstring's per-token, per-layer formula for full fine-tuning with flash attention."""
    spec, a = PRESETS["mistral-7b"], 2
    d, H, KV, hd, inter, V = 4096, 32, 8, 128, 14336, 32000
    parts = activation_bytes(spec, "full", precision="bf16", batch_size=3, seq_len=100)
    per_layer = 8 * d + a * (4 * d + 2 * (H + KV) * hd + 4 * inter) + 8 + 4 * H
    assert parts["layers"] == 300 * 32 * per_layer
    assert parts["head"] == 300 * (4 * d + 4 + a * d + a * d + 4 * V + 16)


def test_activation_options_move_the_right_way():
    base = dict(model="llama-2-7b", method="lora", precision="bf16", seq_len=2048)
    flash = estimate_memory(**base).activations
    assert estimate_memory(**base, attention="eager").activations > flash
    assert estimate_memory(**base, gradient_checkpointing=True).activations < flash / 4
    assert estimate_memory(**base, batch_size=2).activations == 2 * flash - 4 - 2 * 2048 * 128 * 2
    assert estimate_memory(**base, activations=False).activations == 0


# ----------------------------------------------------------------------------- the result


def test_estimate_table_and_units():
    est = estimate_memory("llama-2-7b", "lora", precision="bf16")
    df = est.table()
    assert (
        df.loc["Total", "bytes"]
        == est.total
        == sum(
            est.to_dict()[k]
            for k in (
                "weights",
                "adapter",
                "gradients",
                "master_weights",
                "optimizer_states",
                "activations",
            )
        )
    )
    assert df.loc["Total", "GB"] == est.total / 1e9 == est.gb()
    assert est.table("GiB").loc["Total", "GiB"] == est.total / 2**30 == est.gib()
    assert "llama-2-7b" in str(est) and "<table" in est._repr_html_()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(model="llama-3-8b"), "presets are"),
        (dict(method="prefix"), "method must be one of"),
        (dict(precision="int8"), "precision must be one of"),
        (dict(optimizer="adam"), "optimizer must be one of"),
        (dict(convention="loose"), "convention must be one of"),
        (dict(attention="ring"), "attention must be one of"),
        (dict(method="lora", rank=0), "rank must be a positive integer"),
        (dict(method="lora", rank=True), "rank must be a positive integer"),
        (dict(method="lora", rank=5000), "rank must be at most"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seq_len=-1), "seq_len must be a positive integer"),
        (dict(method="lora", target_modules=["q_proj", "query"]), "valid names are"),
        (dict(method="lora", target_modules=["lm_head"]), "valid names are"),
        (dict(method="lora", target_modules="layers\\.99\\..*"), "matched no linear layer"),
        (dict(method="lora", target_modules=[]), "non-empty"),
        (dict(rank=8), "applies to method 'lora' or 'qlora'"),
        (dict(method="lora", double_quant=False), "applies to method 'qlora' only"),
        (dict(method="lora", lora_dropout=1.0), "lora_dropout must be"),
        (dict(model="gpt2", seq_len=2048), "learned positions"),
        (dict(model=3.5), "model must be a preset name"),
        (dict(model={"hidden_size": 8}), "model_type"),
    ],
)
def test_bad_input(kwargs, message):
    args = {"model": "llama-2-7b", **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        estimate_memory(**args)


def test_bad_specs_and_configs():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelSpec(num_heads=32, num_kv_heads=5)
    with pytest.raises(ValueError, match="naming='gpt2'"):
        ModelSpec(naming="gpt2", mlp="gated")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        ModelSpec(hidden_size=0)
    with pytest.raises(ValueError, match="model_type must be one of"):
        ModelSpec.from_config(transformers.BertConfig())
    with pytest.raises(ValueError, match="hidden_act"):
        ModelSpec.from_config(transformers.LlamaConfig(hidden_act="gelu"))
    with pytest.raises(ValueError, match="positive"):
        lesson_table(-1)
    with pytest.raises(ValueError, match="part must be one of"):
        estimate_memory("gpt2").gb("weight")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        measure_state_bytes("model")
    with pytest.raises(TypeError, match="optimizer"):
        measure_state_bytes(torch.nn.Linear(2, 2), optimizer="adamw")
    with pytest.raises(ValueError, match="meta device"):
        measure_state_bytes(meta_model(published_config("gpt2")))
    with pytest.raises(ValueError, match="state_bytes must be a positive integer"):
        optimizer_state_bytes([10], "adamw", 0)
    with pytest.raises(ValueError, match="requires grad"):
        measure_activation_bytes(torch.nn.Linear(2, 2), lambda: torch.zeros(()))


# ----------------------------------------------------------------------------- the widget


def test_memory_calculator_updates():
    box = memory_calculator()
    controls, output = box.controls, box.output
    lora_html = output.value
    expected = estimate_memory("llama-2-7b", "lora", precision="bf16", rank=8)
    assert f"{expected.gb():,.3f}" in lora_html and "8,388,608" in lora_html
    controls["method"].value = "full"
    assert output.value != lora_html and controls["rank"].disabled
    full = estimate_memory("llama-2-7b", "full", precision="bf16")
    assert f"{full.gb():,.3f}" in output.value
    controls["model"].value = "gpt2"
    controls["seq_len"].value = 4096  # longer than GPT-2's 1024 positions: capped, and said
    assert "gpt2" in output.value and "capped at 1024" in output.value
    with pytest.raises(ValueError, match="model must be one of"):
        memory_calculator(model="gpt-5")


def test_without_activations_the_sequence_length_does_not_matter():
    """activations=False: no activation term, so a sequence past GPT-2's 1,024 positions is fine."""
    spec = ModelSpec.from_config(transformers.GPT2Config())
    short = estimate_memory(spec, "lora", seq_len=8, activations=False)
    long = estimate_memory(spec, "lora", seq_len=4096, activations=False)
    assert short == long and long.activations == 0 and long.activation_parts == {}
    with pytest.raises(ValueError, match="exceeds"):
        estimate_memory(spec, "lora", seq_len=4096)
