"""Hostile files and careless calls: nothing hangs, nothing is silently wrong, nothing is lost.

Each test here failed before the change it covers (issue 12): a hang, a wrong result, a
lost file or an error that did not name its file.
"""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora_lab import GPT, GPTConfig, QLoRALinear, apply_lora, evaluate, generate, train
from lora_lab.adapters import load_adapter, read_adapter_config, save_adapter
from lora_lab.data import Task
from lora_lab.estimate import estimate_memory
from lora_lab.lora import LoRALinear, lora_layers
from lora_lab.model import load_pretrained, save_checkpoint
from lora_lab.specs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
SLOW_PATTERN = "(a|aa)+b"  # exponential backtracking on a long run of a's that does not end in b


def tiny_gpt(n_layer=2, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, intermediate_size=64))


def trained(model=None, seed=1):
    model = apply_lora(model or tiny_gpt(), rank=2, alpha=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(torch.arange(20).view(1, 20))


# ----------------------------------------------------------------------------- no hang


def run_bounded(code, timeout=120):
    """Run ``code`` in a fresh interpreter; a hang fails the test instead of stopping it."""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: it hangs")
    return out


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_catastrophic_regex_is_refused_not_hung():
    out = run_bounded(
        textwrap.dedent(f"""
        import torch.nn as nn
        from lora_lab import apply_lora
        model = nn.Module()
        model.add_module("a" * 40, nn.Linear(4, 4))
        try:
            apply_lora(model, rank=2, target_modules={SLOW_PATTERN!r})
        except ValueError as err:
            print("refused:", err)
    """)
    )
    assert out.returncode == 0, out.stderr
    assert "refused: target_modules regex '(a|aa)+b' took more than 1.0 s" in out.stdout


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_hostile_adapter_config_is_refused_not_hung(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_modules"] = "(m|mm)+$"  # against "model.layers...": fails after backtracking
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    out = run_bounded(
        textwrap.dedent(f"""
        import torch.nn as nn
        from lora_lab import GPT, GPTConfig
        from lora_lab.adapters import load_adapter
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=64))
        model.add_module("m" * 40 + "x", nn.Linear(4, 4))  # a name the pattern backtracks on
        try:
            load_adapter(model, {str(tmp_path / "a")!r})
        except ValueError as err:
            print("refused:", err)
    """)
    )
    assert out.returncode == 0, out.stderr
    assert "took more than" in out.stdout and "adapter_config.json" in out.stdout


def test_overlong_regex_refused():
    with pytest.raises(ValueError, match="regex of 1001 characters; at most 1000"):
        apply_lora(tiny_gpt(), rank=2, target_modules="q" * 1001)


EMPTY_TRAIN = Task("empty", "no train pairs", train=(), test=(("a", "b\n"),))
EMPTY_TEST = Task("empty", "no test pairs", train=(("a", "b\n"),), test=())


def test_empty_splits_are_refused():
    model = trained()
    with pytest.raises(ValueError, match="task 'empty' has an empty train split"):
        train(model, EMPTY_TRAIN, steps=1, lr=1e-3, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="task 'empty' has an empty test split"):
        evaluate(model, EMPTY_TEST)


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "vocab_size"])
def test_absurd_model_sizes_are_refused_at_once(field):
    with pytest.raises(ValueError, match=f"ModelSpec.{field} must be at most"):
        estimate_memory(ModelSpec(**{field: 10**12}))


# ----------------------------------------------------------------------------- no silent wrong result


def test_merged_layers_cannot_be_trained():
    model = trained()
    next(iter(lora_layers(model).values())).merge()
    with pytest.raises(ValueError, match="merged LoRA layers .* call unmerge"):
        train(model, "pirate", steps=1, lr=1e-3, batch_size=2, progress=False)


def test_merged_state_dict_never_applies_the_update_twice():
    model = trained()
    expected = logits(model)
    merged = copy.deepcopy(model)
    for layer in lora_layers(merged).values():
        layer.merge()
    state = merged.state_dict()
    assert sum(k.endswith("lora_merged") for k in state) == len(lora_layers(model))
    fresh = copy.deepcopy(model)  # unmerged
    fresh.load_state_dict(state, strict=True)  # all keys match, and the flag comes along
    assert all(layer.merged for layer in lora_layers(fresh).values())
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-5, atol=1e-5)
    merged.load_state_dict(model.state_dict(), strict=True)  # unmerged weights into merged
    assert not any(layer.merged for layer in lora_layers(merged).values())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=0)


def test_save_adapter_refuses_a_model_with_qlora_layers(tmp_path):
    model = trained()
    model.model.layers[0].mlp.up_proj = QLoRALinear(model.model.layers[0].mlp.up_proj, rank=2)
    with pytest.raises(ValueError, match="QLoRALinear layers .*would lose them"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_diverging_run_stops_before_the_step_and_names_it():
    model = trained()
    with torch.no_grad():  # an infinite weight makes the loss NaN
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with pytest.raises(FloatingPointError, match="the loss is nan at step 0 .of 3."):
        train(model, "pirate", steps=3, lr=1e-3, batch_size=2, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not model.training  # the mode it had before the call


def test_non_finite_adapters_are_neither_saved_nor_loaded(tmp_path):
    model = trained()
    with torch.no_grad():
        lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj.lora_B.weight' in model has 1 non-finite"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    save_adapter(trained(), tmp_path / "b")  # a good file, then NaN written into it by hand
    weights = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})  # as PEFT would write it
    with pytest.raises(ValueError, match="non-finite values"):
        load_adapter(tiny_gpt(), tmp_path / "b")


def test_flipped_bits_are_detected(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last float's mantissa: still a finite number
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its tensors no longer match the SHA-256"):
        load_adapter(tiny_gpt(), tmp_path / "a")


@pytest.mark.parametrize("field, value", [("norm_eps", math.nan), ("rope_theta", math.inf),
                                          ("norm_eps", -math.inf)])  # fmt: skip
def test_config_rejects_non_finite_numbers(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be a finite positive number"):
        GPTConfig(**{field: value})
    save_checkpoint(tiny_gpt(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))  # NaN/Infinity
    with pytest.raises(ValueError, match=f"config.json: GPTConfig.{field} must be"):
        load_pretrained(device="cpu", directory=tmp_path)


def test_adapter_for_a_model_of_another_size_is_refused(tmp_path):
    one_layer = trained(tiny_gpt(n_layer=1))
    save_adapter(one_layer, tmp_path / "a")  # target_modules: layer 0's four projections
    with pytest.raises(ValueError, match="saved on a base model with 8 linear layers"):
        load_adapter(tiny_gpt(n_layer=2), tmp_path / "a")  # layer 0 exists here too


def test_numpy_alpha_is_stored_as_a_python_number(tmp_path):
    model = apply_lora(tiny_gpt(), rank=2, alpha=np.float32(16))
    assert type(next(iter(lora_layers(model).values())).alpha) is float
    save_adapter(model, tmp_path / "a")  # json could not write a NumPy scalar
    assert read_adapter_config(tmp_path / "a")["lora_alpha"] == 16.0


def test_generate_validates_before_changing_the_model_and_refuses_long_prompts():
    model = trained().train()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, "caf\u00e9?")
    assert model.training  # still in the mode the caller left it in
    with pytest.raises(
        ValueError, match="prompt is 97 tokens, longer than the model's context of 96"
    ):
        generate(model, "a" * 97)
    assert model.training
    assert isinstance(generate(model, "a" * 96, max_new_tokens=3, stop=None), str)


# ----------------------------------------------------------------------------- errors name the file


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "empty"])
def test_damaged_adapter_weights_name_the_file(tmp_path, damage):
    save_adapter(trained(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "not safetensors": b"PK\x03\x04zip",
                         "empty": b""}[damage])  # fmt: skip
    with pytest.raises(
        ValueError, match="adapter_model.safetensors' is not a readable safetensors"
    ):
        load_adapter(tiny_gpt(), tmp_path / "a")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_bad_checkpoint_config_names_the_file(tmp_path, content):
    save_checkpoint(tiny_gpt(), tmp_path)
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json: (not valid JSON|must hold a JSON object)"):
        load_pretrained(device="cpu", directory=tmp_path)


def test_damaged_checkpoint_weights_name_the_file(tmp_path):
    save_checkpoint(tiny_gpt(), tmp_path)
    weights = tmp_path / "tiny_gpt.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match="tiny_gpt.safetensors' is not a readable safetensors file"
    ):
        load_pretrained(device="cpu", directory=tmp_path)


def test_bad_adapter_config_encoding_names_the_file(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        load_adapter(tiny_gpt(), tmp_path / "a")


# ----------------------------------------------------------------------------- nothing lost

CRASH = """\
import os, sys, torch
import lora_lab.adapters as adapters
from tests.test_hostile import trained

crash_at = sys.argv[2]
def step(name):
    if name == crash_at:
        os._exit(17)  # as if the machine lost power here: no cleanup runs
adapters._step = step
adapters.save_adapter(trained(seed=2), sys.argv[1])  # the new adapter
"""
STEPS = ["weights written", "config written", "synced", "exchanged", "old removed"]


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
@pytest.mark.parametrize("crash_at", STEPS)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, crash_at):
    path = tmp_path / "adapter"
    old, new = trained(seed=1), trained(seed=2)
    save_adapter(old, path)
    (path / "README.md").write_text("notes")
    out = subprocess.run([sys.executable, "-c", CRASH, str(path), crash_at], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 17, out.stderr  # it did stop at that step
    got = logits(load_adapter(tiny_gpt(), path).eval())
    expected = logits(new) if STEPS.index(crash_at) >= STEPS.index("exchanged") else logits(old)
    assert torch.equal(got, expected)  # complete: the old adapter or the new one, never a mix
    assert (path / "README.md").read_text() == "notes"
    save_adapter(new, path)  # the next save clears what the crash left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_first_save_killed_leaves_nothing_or_everything(tmp_path):
    path = tmp_path / "adapter"
    out = subprocess.run([sys.executable, "-c", CRASH, str(path), "synced"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 17
    assert not path.exists()  # nothing at the path: no half adapter
    save_adapter(trained(seed=2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failing_save_leaves_no_debris_and_the_old_adapter(tmp_path, monkeypatch):
    import lora_lab.adapters as adapters

    path = tmp_path / "adapter"
    save_adapter(trained(seed=1), path)

    def fail(name):
        if name == "synced":
            raise OSError("disk full")

    monkeypatch.setattr(adapters, "_step", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(seed=2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(logits(load_adapter(tiny_gpt(), path).eval()), logits(trained(seed=1)))


def test_save_uses_an_atomic_exchange_here():
    """On this Linux machine the old and new adapter swap in one step (renameat2)."""
    from lora_lab.adapters import exchange_paths

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d, "a"), Path(d, "b")
        a.mkdir()
        b.mkdir()
        (a / "x").write_text("a")
        (b / "x").write_text("b")
        assert exchange_paths(a, b)
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    assert os.name == "posix"


def test_loralinear_train_mode_restored_after_failed_evaluate():
    model = trained().train()
    with pytest.raises(ValueError):
        evaluate(model, EMPTY_TEST)
    assert model.training
    layer = LoRALinear(nn.Linear(4, 4), rank=2)
    assert layer.training
