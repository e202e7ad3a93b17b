"""Any model: the MODEL switch, 16-bit choices, sizes of every family, LoRA equal to PEFT on them.

Every model here is a tiny random-weight transformers model built offline by
``save_random_model``: nothing is downloaded.
"""

import copy
import warnings

import peft
import pytest
import torch

import lora_lab
from lora_lab import apply_lora, count_parameters, load_model, save_random_model
from lora_lab.adapters import load_adapter, read_adapter_config, save_adapter
from lora_lab.hub import (
    MODEL_ENV,
    RANDOM_ARCHS,
    SETTINGS_BY_SIZE,
    SHIPPED_MODEL,
    chosen_model,
    half_dtype,
    is_shipped,
    load_dtype,
    logit_tolerance,
    logits_agree,
    train_settings,
)
from lora_lab.lora import LoRALinear, is_conv1d, lora_layers, merge_lora
from lora_lab.specs import ModelSpec

TEXT = "LoRA trains two thin matrices beside a frozen weight!"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> folder of a tiny random model, bf16 (GPT-2 too: both 16-bit paths)."""
    root = tmp_path_factory.mktemp("models")
    return {a: save_random_model(a, root / a, dtype=torch.bfloat16) for a in RANDOM_ARCHS}


def loaded(folder, dtype=None):
    kwargs = {} if dtype is None else {"dtype": dtype}
    return load_model(str(folder), device="cpu", **kwargs)


def randomize_B(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            B = layer.lora_B.weight
            B.copy_(0.05 * torch.randn(B.shape, generator=gen))
    return model


def peft_twin(base, ours, targets, rank=4, alpha=8):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that it turns fan_in_fan_out on for Conv1D
        twin = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return twin.eval()


def logits(model, tok):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(TEXT)])).logits


# ----------------------------------------------------------------------------- the switch


def test_chosen_model_reads_the_environment(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert chosen_model() == SHIPPED_MODEL and is_shipped(chosen_model())
    monkeypatch.setenv(MODEL_ENV, "  ")
    assert chosen_model() == SHIPPED_MODEL  # blank means unset
    monkeypatch.setenv(MODEL_ENV, "Qwen/Qwen2.5-0.5B")
    assert chosen_model() == "Qwen/Qwen2.5-0.5B" and not is_shipped(chosen_model())
    assert is_shipped(None)


def test_load_model_shipped_and_local_folder(saved):
    model, tok = load_model(SHIPPED_MODEL, device="cpu")
    assert isinstance(model, lora_lab.GPT) and tok.vocab_size == 96
    hf, hf_tok = loaded(saved["qwen2"])
    assert hf.dtype == torch.bfloat16  # stored bf16, CPU: stays bf16
    assert hf_tok.encode("abc") == tok.encode("abc")
    assert loaded(saved["qwen2"], dtype=torch.float32)[0].dtype == torch.float32  # asked for


# ----------------------------------------------------------------------------- 16-bit


def test_half_dtype_follows_compute_capability(monkeypatch):
    assert half_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert half_dtype("cuda") == torch.float16  # a T4: no native bf16
    assert load_dtype("bfloat16", "cuda") == torch.float16
    assert load_dtype(torch.float16, "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert half_dtype("cuda") == torch.bfloat16  # an A100
    assert load_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert load_dtype(torch.float16, "cuda") == torch.float16  # fp16 weights stay fp16
    assert load_dtype(torch.float32, "cuda") == torch.float32
    assert load_dtype(None, "cpu") == torch.float32
    assert load_dtype("bfloat16", "cpu") == torch.bfloat16


def test_logit_tolerance():
    assert logit_tolerance(torch.float32) == (0.0, 0.0)
    assert logit_tolerance(torch.bfloat16) == (2**-6, 2**-6)
    a = torch.tensor([1.0, 2.0])
    assert logits_agree(a, a.clone()) and not logits_agree(a, a + 1e-7)  # fp32: exact
    b = a.bfloat16()
    assert logits_agree(b, (a * (1 + 2**-8)).bfloat16())
    assert not logits_agree(b, (a * 1.05).bfloat16())
    with pytest.raises(ValueError, match="dtype must be one of"):
        logit_tolerance(torch.int8)
    with pytest.raises(ValueError, match="a and b must match"):
        logits_agree(a, b)


def test_train_settings_by_size(saved):
    shipped = lora_lab.load_pretrained(device="cpu")
    row = train_settings(shipped)
    assert (row.lr_lora, row.lr_full, row.batch_size, row.steps) == (3e-3, 3e-4, 16, 60)
    limits = [limit for limit, _ in SETTINGS_BY_SIZE]
    assert limits == sorted(limits)
    with torch.device("meta"):
        import transformers

        big = transformers.LlamaForCausalLM(transformers.LlamaConfig())  # Llama-2-7B's shape
    assert train_settings(big).lr_lora == 2e-4 and train_settings(big).batch_size == 4
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train_settings("gpt2")


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("arch", RANDOM_ARCHS)
def test_spec_reads_every_family(saved, arch):
    model, _ = loaded(saved[arch])
    spec = ModelSpec.from_model(model)
    assert spec.parameter_shapes() == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert spec.num_parameters() == count_parameters(model)[1]
    if arch != "gpt2":
        assert spec.kv_dim == 2 * spec.dim_per_head < spec.qk_dim  # grouped-query attention
    wrapped = apply_lora(model, rank=2, target_modules=spec.attention_targets())
    assert ModelSpec.from_model(wrapped) == spec  # sizes read through LoRA's wrappers too


@pytest.mark.parametrize("arch", RANDOM_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_equals_peft_on_every_family(saved, arch, dtype, tmp_path):
    """Counts, logits and adapter files both ways, on the family's attention projections."""
    base, tok = loaded(saved[arch], dtype=dtype)
    targets = list(ModelSpec.from_model(base).attention_targets())
    ours = randomize_B(apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=targets))
    ours.eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)
    twin = peft_twin(base, ours, targets)
    assert count_parameters(ours) == twin.get_nb_trainable_parameters()
    mine, theirs, plain = logits(ours, tok), logits(twin, tok), logits(base, tok)
    assert mine.dtype == dtype
    assert logits_agree(mine, theirs) and not logits_agree(mine, plain)
    # adapter files: ours into PEFT, PEFT's into ours
    save_adapter(ours, tmp_path / "ours")
    assert read_adapter_config(tmp_path / "ours")["fan_in_fan_out"] == (arch == "gpt2")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert logits_agree(logits(back, tok), mine)
    twin.save_pretrained(tmp_path / "peft")
    again = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert logits_agree(logits(again, tok), theirs)


def test_conv1d_layer_merge_and_peft_fan_in_fan_out(saved):
    """GPT-2's Conv1D: the update is merged transposed, and equals PEFT's layer."""
    model, tok = loaded(saved["gpt2"], dtype=torch.float32)
    conv = model.transformer.h[0].attn.c_attn
    assert is_conv1d(conv) and not is_conv1d(torch.nn.Linear(2, 2))
    layer = LoRALinear(copy.deepcopy(conv), rank=4, alpha=8)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (64, 192)
    randomize_B(layer)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)
    merged = merge_lora(
        randomize_B(apply_lora(copy.deepcopy(model), rank=4, target_modules=["c_attn"]))
    )
    assert is_conv1d(merged.transformer.h[0].attn.c_attn)
    with pytest.raises(ValueError, match="matched no module; the linear layers are: .*c_attn"):
        apply_lora(copy.deepcopy(model), rank=4, target_modules=["q_proj"])


def test_adapter_for_conv1d_refused_on_linear_layers(saved, tmp_path):
    gpt2, _ = loaded(saved["gpt2"], dtype=torch.float32)
    save_adapter(apply_lora(copy.deepcopy(gpt2), rank=2, target_modules=["c_fc"]), tmp_path / "a")
    config = (
        (tmp_path / "a" / "adapter_config.json")
        .read_text()
        .replace('"fan_in_fan_out": true', '"fan_in_fan_out": false')
    )
    (tmp_path / "a" / "adapter_config.json").write_text(config)
    with pytest.raises(
        ValueError, match="fan_in_fan_out=False, but .*c_fc' is a transformers Conv1D"
    ):
        load_adapter(copy.deepcopy(gpt2), tmp_path / "a")


# ----------------------------------------------------------------------------- training


def test_train_refuses_16bit_trainable_and_trains_mixed_precision(saved):
    base, tok = loaded(saved["qwen2"])  # bf16
    pure = copy.deepcopy(base).requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable parameters are \['torch.bfloat16'\]"):
        lora_lab.train(
            pure, "pirate", steps=1, lr=1e-3, batch_size=2, tokenizer=tok, progress=False
        )
    with pytest.raises(ValueError, match="autocast_dtype must be None"):
        lora_lab.train(copy.deepcopy(base).float().requires_grad_(True), "pirate", steps=1,
                       lr=1e-3, batch_size=2, tokenizer=tok, autocast_dtype=torch.int8)  # fmt: skip
    master = copy.deepcopy(base).float().requires_grad_(True)  # fp32 master weights
    before = {n: p.detach().clone() for n, p in master.named_parameters()}
    history = lora_lab.train(master, "pirate", steps=3, lr=1e-3, batch_size=4, tokenizer=tok,
                             autocast_dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert all(torch.isfinite(torch.tensor(history.loss)))
    moved = [n for n, p in master.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every fp32 weight took the small AdamW steps
    # LoRA on the bf16 base: fp32 adapters train, the base stays bf16 and untouched
    lora = apply_lora(copy.deepcopy(base), rank=2, target_modules=["q_proj", "v_proj"])
    frozen = {n: p.clone() for n, p in lora.named_parameters() if not p.requires_grad}
    lora_lab.train(lora, "pirate", steps=2, lr=1e-2, batch_size=4, tokenizer=tok, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if n in frozen)
    assert any(p.dtype == torch.bfloat16 for p in frozen.values())
