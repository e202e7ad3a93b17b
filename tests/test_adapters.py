"""lora_lab.adapters: PEFT's file format both ways, strict loading, no pickles, atomic saves.

Tolerance: outputs are compared bit for bit (torch.equal) where both sides run the same
operations on the same weights; nothing here needs a float tolerance.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import pickle
import re
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_lab import adapters
from lora_lab.adapters import load_adapter, save_adapter
from lora_lab.lora import apply_lora, count_parameters, lora_layers
from tests.test_lora import TinyNet, ids, randomize_lora, tiny_llama

TARGETS = ("q_proj", "v_proj")


def trained_llama(rank=4, alpha=8, targets=TARGETS, **kw):
    model = apply_lora(tiny_llama(), rank=rank, alpha=alpha, target_modules=targets, **kw)
    randomize_lora(model, seed=4)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


# ----------------------------------------------------------------------------- the format


def test_files_keys_and_config_follow_peft(tmp_path):
    model = trained_llama(rank=4, alpha=8, dropout=0.05, use_rslora=True)
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["use_rslora"] is True and config["use_dora"] is False
    assert config["target_modules"] == sorted(lora_layers(model))  # full names of the layers
    # PEFT reads the config without complaint and gets the same values
    loaded = peft.LoraConfig.from_pretrained(str(path))
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout, loaded.use_rslora) == (
        4,
        8,
        0.05,
        True,
    )
    tensors = load_file(path / "adapter_model.safetensors")
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
        for i in (0, 1)
        for m in ("q", "v")
        for ab in ("A", "B")
    }
    assert set(tensors) == expected
    layer = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    assert torch.equal(
        tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"],
        layer.lora_B.weight,
    )
    with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
        meta = f.metadata()
    # PEFT's entry, and lora_lab's checksum and base-model fingerprint (PEFT ignores them)
    assert meta["format"] == "pt" and set(meta) == {"format", "lora_lab_sha256", "lora_lab_base"}
    # the file holds the LoRA weights and nothing else: 4 bytes per trainable float32
    trainable, _ = count_parameters(model)
    header = 8 + int.from_bytes((path / "adapter_model.safetensors").read_bytes()[:8], "little")
    assert (path / "adapter_model.safetensors").stat().st_size == header + 4 * trainable


@pytest.mark.parametrize(
    "kw", [{}, {"use_rslora": True, "dropout": 0.1}, {"targets": "all-linear"}], ids=str
)
def test_lora_lab_adapter_loads_in_peft_with_equal_outputs(tmp_path, kw):
    targets = kw.pop("targets", TARGETS)
    ours = trained_llama(targets=targets, **kw)
    save_adapter(ours, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    # PEFT warns about keys it could not place or config entries it does not know
    complaints = [
        str(w.message) for w in caught if re.search("missing|unexpected", str(w.message), re.I)
    ]
    assert complaints == []
    scalings = {
        layer.scaling["default"]
        for layer in theirs.modules()
        if hasattr(layer, "scaling") and isinstance(layer.scaling, dict)
    }
    assert scalings == {layer.scaling for layer in lora_layers(ours).values()}
    assert len(lora_layers(ours)) == sum(
        isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules()
    )
    assert torch.equal(logits(ours), logits(theirs))
    assert not torch.equal(logits(ours), logits(tiny_llama()))  # the adapter matters


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], r".*\.(k|o)_proj", "all-linear"],
    ids=["list", "regex", "all-linear"],
)
def test_peft_adapter_loads_in_lora_lab_with_equal_outputs(tmp_path, targets):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=targets
    )
    theirs = peft.get_peft_model(tiny_llama(), cfg)
    randomize_lora(theirs, seed=9)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(tiny_llama(), tmp_path / "p").eval()
    assert torch.equal(logits(ours), logits(theirs.eval()))
    layer = next(iter(lora_layers(ours).values()))
    assert (layer.rank, layer.alpha, layer.lora_dropout.p, layer.use_rslora) == (4, 16, 0.1, True)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_peft_target_list_in_any_order(tmp_path):
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, target_modules=["o_proj", "q_proj", "up_proj"])
    )
    randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    config_file = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for order in (sorted, lambda t: sorted(t, reverse=True)):
        config["target_modules"] = order(config["target_modules"])
        config_file.write_text(json.dumps(config))
        ours = load_adapter(tiny_llama(), tmp_path / "p").eval()
        assert len(lora_layers(ours)) == 6
        assert torch.equal(logits(ours), logits(theirs.eval()))


def test_round_trip_on_a_plain_module(tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    fresh = TinyNet()
    fresh.load_state_dict(net.state_dict())
    apply_lora(net, rank=3, alpha=6, target_modules="all-linear")
    randomize_lora(net)
    save_adapter(net, tmp_path / "net")
    load_adapter(fresh, tmp_path / "net")
    x = torch.randn(2, 5, 12)
    assert torch.equal(net(x), fresh(x))
    assert sorted(lora_layers(fresh)) == ["encoder.fc1", "encoder.fc2"]


def test_loaded_weights_follow_the_model_dtype(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    model = load_adapter(tiny_llama().to(torch.float64), tmp_path / "a")
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.weight.dtype == torch.float64
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(
        layer.lora_A.weight,
        saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double(),
    )


# ----------------------------------------------------------------------------- strict loading


def rewrite_weights(path, change):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def assert_untouched(model):
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_unused_key_raises_and_names_it(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    rewrite_weights(tmp_path / "a", lambda t: t.update({extra: torch.zeros(4, 32)}))
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"keys that match no LoRA layer: \['{extra}'\]"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model)


def test_missing_key_raises_and_names_it(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite_weights(tmp_path / "a", lambda t: t.pop(gone))
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"lacks the keys \['{gone}'\]"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    rewrite_weights(tmp_path / "a", lambda t: t.update({key: torch.zeros(32, 4)}))
    model = tiny_llama()
    with pytest.raises(
        ValueError,
        match=rf"shape mismatch for '{key}': the file has \(32, 4\), the model needs \(16, 4\)",
    ):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model)
    # an adapter for a wider model: every layer's shape is wrong
    save_adapter(trained_llama(), tmp_path / "b")
    with pytest.raises(
        ValueError, match=r"shape mismatch .*the file has \(4, 32\), the model needs \(4, 64\)"
    ):
        load_adapter(tiny_llama(hidden_size=64), tmp_path / "b")


def test_targets_absent_from_the_model(tmp_path):
    save_adapter(apply_lora(TinyNet(), rank=2, target_modules=["fc1"]), tmp_path / "net")
    with pytest.raises(
        ValueError, match=r"matched no module; the linear layers are: model.layers.0"
    ):
        load_adapter(tiny_llama(), tmp_path / "net")


def test_model_that_already_has_lora(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapter(trained_llama(), tmp_path / "a")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory .*nowhere.* does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    save_adapter(trained_llama(), tmp_path / "a")
    with pytest.raises(NotADirectoryError, match="is a file; pass the adapter directory"):
        load_adapter(tiny_llama(), tmp_path / "a" / "adapter_config.json")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors' is missing"):
        load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json' is missing"):
        load_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(TypeError, match="path must be a non-empty str or os.PathLike, got 3"):
        load_adapter(tiny_llama(), 3)


def test_pickles_are_refused_and_never_loaded(tmp_path, monkeypatch):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)  # a pickle file
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    theirs.save_pretrained(str(tmp_path / "st"))

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_pickles)
    monkeypatch.setattr(pickle, "load", no_pickles)
    monkeypatch.setattr(pickle, "loads", no_pickles)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"holds \['adapter_model.bin'\] .*never loads pickles"):
        load_adapter(model, tmp_path / "bin")
    assert_untouched(model)
    assert len(lora_layers(load_adapter(tiny_llama(), tmp_path / "st"))) == 2  # safetensors: fine


@pytest.mark.parametrize(
    "key,value",
    [
        ("peft_type", "IA3"),
        ("init_lora_weights", "olora"),
        ("bias", "all"),
        ("rank_pattern", {"q_proj": 8}),
        ("modules_to_save", ["lm_head"]),
        ("fan_in_fan_out", True),
    ],
)
def test_unsupported_config_is_refused(tmp_path, key, value):
    save_adapter(trained_llama(), tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[key] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"{key}.*{value!r}".replace("[", r"\[").replace("{", r"\{")
    ):
        load_adapter(tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize("key,value", [("r", 0), ("lora_alpha", -1), ("lora_dropout", 1.0)])
def test_bad_hyperparameters_in_config(tmp_path, key, value):
    save_adapter(trained_llama(), tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[key] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"got {value} \(read from .*adapter_config.json\)"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_broken_json(tmp_path):
    save_adapter(trained_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(tiny_llama(), tmp_path / "a")


# ----------------------------------------------------------------------------- atomic saves


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_crash_mid_save_leaves_no_adapter(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(trained_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert leftovers(tmp_path) == []  # the temporary directory was removed


def test_crash_mid_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    save_adapter(trained_llama(rank=2), tmp_path / "a")
    before = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")}
    monkeypatch.setattr(
        json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("crash (simulated)"))
    )
    with pytest.raises(OSError, match="simulated"):
        save_adapter(trained_llama(rank=4), tmp_path / "a")
    after = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")}
    assert after == before and leftovers(tmp_path) == []


def test_save_replaces_an_existing_adapter(tmp_path):
    save_adapter(trained_llama(rank=2), tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("my notes on this adapter")
    new = trained_llama(rank=4)
    save_adapter(new, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    assert sorted(os.listdir(tmp_path / "a")) == [
        "README.md",  # not written by lora_lab, so kept
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (tmp_path / "a" / "README.md").read_text() == "my notes on this adapter"
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path / "a").eval()), logits(new))


def test_save_refuses_to_replace_other_things(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(
        FileExistsError, match=r"not an adapter directory \(it holds \['thesis.tex'\]\)"
    ):
        save_adapter(trained_llama(), tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        save_adapter(trained_llama(), tmp_path / "file")
    assert leftovers(tmp_path) == []


def test_save_needs_lora_layers_of_one_kind(tmp_path):
    with pytest.raises(ValueError, match="model has no LoRALinear layers"):
        save_adapter(tiny_llama(), tmp_path / "a")
    model = apply_lora(tiny_llama(), rank=2, target_modules=["q_proj"])
    apply_lora(model, rank=4, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="the LoRA layers differ in rank"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
