"""lora_lab.serving: named adapters, mixed batches and hot-swapping, against PEFT.

Tolerance: float32 logits are compared to 1e-6 (a sub-batch of one row may take another
matrix-product kernel than the whole batch, so bits can differ). A bf16 base rounds the
update once per layer in lora_lab and twice in PEFT's mixed batch (PEFT rounds the update
to bf16 before adding it), so bf16 comparisons use ``logits_agree`` (two units in the last
place).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import gc
import json
import weakref

import peft
import pytest
import torch
import torch.nn as nn
from peft.utils.hotswap import hotswap_adapter

from lora_lab import apply_lora, load_adapter, load_model, save_adapter, save_random_model
from lora_lab.hub import logits_agree
from lora_lab.model import load_pretrained
from lora_lab.serving import (
    BASE,
    MultiLoRALinear,
    active_adapter,
    add_adapter,
    delete_adapter,
    group_rows,
    hot_swap,
    list_adapters,
    load_named_adapter,
    mixed_batch,
    multi_lora_layers,
    set_adapter,
)
from lora_lab.training import logits_of
from tests.test_lora import randomize_lora

ATOL = 1e-6  # float32 logits
# three adapters on different layers and ranks: a row's adapter may be absent from a layer
GPT_ADAPTERS = {
    "pirate": dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "butler": dict(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "poet": dict(rank=2, alpha=4, target_modules="all-linear", use_rslora=True),
}


def adapter_dirs(base, specs, root, seed=0):
    """Save one lora_lab adapter per spec, trained on nothing but with random non-zero A, B."""
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        model = apply_lora(copy.deepcopy(base), **spec)
        randomize_lora(model, seed=seed + i)
        dirs[name] = save_adapter(model, root / name)
    return dirs


def ours_with(base, dirs):
    model = copy.deepcopy(base)
    for name, path in dirs.items():
        load_named_adapter(model, path, name)
    return model.eval()


def peft_with(base, dirs):
    names = list(dirs)
    model = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    return model.eval()


def run(model, x, **kw):
    with torch.no_grad():
        return logits_of(model, x) if not kw else model(x, **kw)


def as_logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def gpt():
    return load_pretrained(device="cpu")


@pytest.fixture(scope="module")
def gpt_dirs(gpt, tmp_path_factory):
    return adapter_dirs(gpt, GPT_ADAPTERS, tmp_path_factory.mktemp("gpt-adapters"))


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 96, (5, 24), generator=torch.Generator().manual_seed(0))


NAMES = ["pirate", BASE, "poet", "butler", "pirate"]  # every adapter, the base, a repeat


# ----------------------------------------------------------------------------- against PEFT


def test_each_adapter_alone_equals_peft(gpt, gpt_dirs, x):
    ours, theirs = ours_with(gpt, gpt_dirs), peft_with(gpt, gpt_dirs)
    assert list_adapters(ours) == tuple(GPT_ADAPTERS) and active_adapter(ours) == "pirate"
    for name in GPT_ADAPTERS:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        got, want = run(ours, x), run(theirs, x)
        assert (got - want).abs().max() <= ATOL, name
        assert not torch.allclose(got, run(gpt, x), atol=1e-3)  # the adapter changes the output
    set_adapter(ours, None)
    assert torch.equal(run(ours, x), run(gpt, x)) and active_adapter(ours) is None


def test_state_dict_keys_are_peft_keys(gpt, gpt_dirs):
    ours, theirs = ours_with(gpt, gpt_dirs), peft_with(gpt, gpt_dirs)
    peft_keys = {k.removeprefix("base_model.model.") for k in theirs.state_dict()}
    assert set(ours.state_dict()) == peft_keys


def test_mixed_batch_rows_equal_each_adapter_alone_in_lora_lab_and_peft(gpt, gpt_dirs, x):
    ours, theirs = ours_with(gpt, gpt_dirs), peft_with(gpt, gpt_dirs)
    alone_ours, alone_peft = {BASE: run(gpt, x)}, {BASE: run(gpt, x)}
    for name in GPT_ADAPTERS:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        alone_ours[name], alone_peft[name] = run(ours, x), run(theirs, x)
    set_adapter(ours, "butler")
    with mixed_batch(ours, NAMES):
        mixed = run(ours, x)
    mixed_peft = run(theirs, x, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        assert (mixed[i] - alone_ours[name][i]).abs().max() <= ATOL, (i, name)
        assert (mixed_peft[i] - alone_peft[name][i]).abs().max() <= ATOL, (i, name)
    assert torch.equal(mixed[1], alone_ours[BASE][1])  # the base row is the base model's
    assert (mixed - mixed_peft).abs().max() <= ATOL
    assert active_adapter(ours) == "butler"  # the block leaves the active adapter as it was
    assert torch.equal(run(ours, x), alone_ours["butler"])
    assert all(layer.row_adapters is None for layer in multi_lora_layers(ours).values())


def test_none_means_the_base_and_one_adapter_for_all_rows_is_the_single_path(gpt, gpt_dirs, x):
    ours = ours_with(gpt, gpt_dirs)
    with mixed_batch(ours, [None] * 5):
        assert torch.equal(run(ours, x), run(gpt, x))
    set_adapter(ours, "poet")
    alone = run(ours, x)
    set_adapter(ours, "pirate")
    with mixed_batch(ours, ("poet",) * 5):  # one adapter for every row: the single path
        assert torch.equal(run(ours, x), alone)


def test_a_peft_written_adapter_loads_by_name(gpt, tmp_path, x):
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], lora_dropout=0.1)
    theirs = peft.get_peft_model(copy.deepcopy(gpt), cfg)
    randomize_lora(theirs, seed=9)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = load_named_adapter(copy.deepcopy(gpt), tmp_path / "peft", "stranger").eval()
    assert (run(ours, x) - run(theirs.eval(), x)).abs().max() <= ATOL


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    gpt2 = save_random_model("gpt2", root / "gpt2", dtype=torch.float32)
    qwen = save_random_model("qwen2", root / "qwen2", dtype=torch.bfloat16)
    return {
        "gpt2-fp32": (load_model(gpt2, device="cpu")[0], ["c_attn", "attn.c_proj", "mlp.c_fc"]),
        "qwen2-bf16": (load_model(qwen, device="cpu")[0], ["q_proj", "v_proj", "down_proj"]),
    }


def close(a, b):
    """float32: within ATOL; 16-bit: ``logits_agree``."""
    if a.dtype == torch.float32:
        return (a - b).abs().max() <= ATOL
    return logits_agree(a, b)


@pytest.mark.parametrize("kind", ["gpt2-fp32", "qwen2-bf16"])
def test_transformers_models_conv1d_and_bf16(hf_models, kind, tmp_path):
    base, targets = hf_models[kind]
    specs = {"a": dict(rank=4, alpha=8, target_modules=targets), "b": dict(rank=2, alpha=2,
             target_modules=targets[1:])}  # fmt: skip
    dirs = adapter_dirs(base, specs, tmp_path)
    ours, theirs = ours_with(base, dirs), peft_with(base, dirs)
    x = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    layer = next(iter(multi_lora_layers(ours).values()))
    assert layer.fan_in_fan_out == (kind == "gpt2-fp32")
    assert layer.lora_A["a"].weight.dtype == torch.float32  # fp32 adapters on a bf16 base too
    alone = {BASE: as_logits(run(base, x))}
    for name in specs:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        alone[name] = as_logits(run(ours, x))
        assert close(alone[name], as_logits(run(theirs, x))), name
    names = ["a", BASE, "b", "a"]
    with mixed_batch(ours, names):
        mixed = as_logits(run(ours, x))
    mixed_peft = as_logits(run(theirs, x, adapter_names=names))
    assert mixed.dtype == next(base.parameters()).dtype
    for i, name in enumerate(names):
        assert close(mixed[i], alone[name][i]), (i, name)
    assert close(mixed, mixed_peft)


# ----------------------------------------------------------------------------- hot-swapping


def test_hot_swap_gives_the_new_adapter_in_the_same_tensors(gpt, gpt_dirs, tmp_path, x):
    spec = dict(GPT_ADAPTERS["butler"], alpha=32)  # same layers and rank, another alpha
    new_dir = adapter_dirs(gpt, {"butler2": spec}, tmp_path, seed=50)["butler2"]
    ours = ours_with(gpt, gpt_dirs)
    set_adapter(ours, "butler")
    params = {n: (p, p.data_ptr()) for n, p in ours.named_parameters()}
    modules = dict(ours.named_modules())
    hot_swap(ours, "butler", new_dir)
    assert {n: (p, p.data_ptr()) for n, p in ours.named_parameters()} == params
    assert all(m is modules[n] for n, m in ours.named_modules())
    alone = load_adapter(copy.deepcopy(gpt), new_dir).eval()
    assert (run(ours, x) - run(alone, x)).abs().max() <= ATOL
    theirs = peft_with(gpt, gpt_dirs)
    hotswap_adapter(theirs, str(new_dir), adapter_name="butler")
    theirs.set_adapter("butler")
    assert (run(ours, x) - run(theirs, x)).abs().max() <= ATOL
    set_adapter(ours, "pirate")  # the other adapters are untouched
    assert (run(ours, x) - run(ours_with(gpt, gpt_dirs), x)).abs().max() <= ATOL


def test_hot_swap_refuses_other_shapes_and_changes_nothing(gpt, gpt_dirs, tmp_path, x):
    ours = ours_with(gpt, gpt_dirs)
    set_adapter(ours, "butler")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    other_rank = dict(GPT_ADAPTERS["butler"], rank=4)
    fewer = dict(GPT_ADAPTERS["butler"], target_modules=["q_proj", "v_proj"])
    dirs = adapter_dirs(gpt, {"r4": other_rank, "qv": fewer}, tmp_path)
    with pytest.raises(ValueError, match=r"rank r=4, adapter 'butler' has rank \[8\]"):
        hot_swap(ours, "butler", dirs["r4"])
    with pytest.raises(ValueError, match=r"only in the model \['model.layers.0.self_attn.k_proj'"):
        hot_swap(ours, "butler", dirs["qv"])
    with pytest.raises(ValueError, match=r"'nobody' is not on the model; .*'pirate', 'butler'"):
        hot_swap(ours, "nobody", dirs["r4"])
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hot_swap_reads_files_as_strictly_as_load_adapter(gpt, gpt_dirs, tmp_path):
    ours = ours_with(gpt, gpt_dirs)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in gpt_dirs["pirate"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    raw = bytearray((broken / "adapter_model.safetensors").read_bytes())
    raw[-4] ^= 1  # one flipped bit: the recorded SHA-256 no longer matches
    (broken / "adapter_model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is damaged"):
        hot_swap(ours, "pirate", broken)
    with pytest.raises(ValueError, match="is damaged"):
        load_named_adapter(ours, broken, "again")
    config = json.loads((gpt_dirs["pirate"] / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        hot_swap(ours, "pirate", broken)
    for entry, match in [({"use_dora": True}, "use_dora=True in"), (
            {"init_lora_weights": "pissa"}, "pissa changed the base weight")]:  # fmt: skip
        (broken / "adapter_config.json").write_text(json.dumps({**config, **entry}))
        with pytest.raises(ValueError, match=match):
            load_named_adapter(ours, broken, "again")


# ----------------------------------------------------------------------------- add, delete


def test_delete_frees_the_weights_and_unwraps_empty_layers(gpt, gpt_dirs, x):
    ours = ours_with(gpt, gpt_dirs)
    set_adapter(ours, "poet")
    layer = ours.model.layers[0].mlp.up_proj  # only poet targets the MLP
    refs = [weakref.ref(layer.lora_A["poet"].weight), weakref.ref(layer.lora_B["poet"].weight)]
    n_before = sum(p.numel() for p in ours.parameters())
    delete_adapter(ours, "poet")
    del layer
    gc.collect()
    assert all(r() is None for r in refs)  # nothing holds the tensors any more
    assert list_adapters(ours) == ("pirate", "butler") and active_adapter(ours) is None
    assert isinstance(ours.model.layers[0].mlp.up_proj, nn.Linear)  # no adapter left there
    poet_numel = 4 * (4 * 2 * (128 + 128) + 3 * 2 * (128 + 352))  # rank 2, 7 layers a block
    assert n_before - sum(p.numel() for p in ours.parameters()) == poet_numel
    delete_adapter(ours, "pirate")
    delete_adapter(ours, "butler")
    assert not multi_lora_layers(ours) and list_adapters(ours) == ()
    assert ours.state_dict().keys() == gpt.state_dict().keys()
    assert torch.equal(run(ours, x), run(gpt, x))


def test_add_adapter_starts_at_zero_and_the_first_becomes_active(gpt, x):
    model = add_adapter(copy.deepcopy(gpt), "new", rank=4, alpha=8).eval()
    assert active_adapter(model) == "new" and list_adapters(model) == ("new",)
    assert torch.equal(run(model, x), run(gpt, x))  # B = 0
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, MultiLoRALinear) and layer.scaling == {"new": 2.0}
    assert not any(p.requires_grad for p in model.parameters())  # a serving model is frozen
    add_adapter(model, "second", rank=2, alpha=2, target_modules=["q_proj"])
    assert active_adapter(model) == "new" and list_adapters(model) == ("new", "second")
    with torch.no_grad():
        layer.lora_B["new"].weight.fill_(0.01)
    assert torch.equal(
        layer.delta_weight("new"),
        2.0 * layer.lora_B["new"].weight @ layer.lora_A["new"].weight,
    )


def test_group_rows_keeps_first_appearance_order():
    assert group_rows(["b", "a", "b", BASE]) == {"b": [0, 2], "a": [1], BASE: [3]}


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def served(gpt, gpt_dirs):
    return ours_with(gpt, {k: gpt_dirs[k] for k in ("pirate", "butler")})


@pytest.mark.parametrize(
    "names, error, match",
    [
        (
            ["pirate", "nobody"],
            ValueError,
            r"adapter_names\[1\] is 'nobody'.*\['pirate', 'butler'\]",
        ),
        ("pirate", TypeError, "must be a non-empty list"),
        ([], TypeError, "must be a non-empty list"),
        ([1, 2], ValueError, r"adapter_names\[0\] is 1"),
    ],
)
def test_mixed_batch_rejects_bad_names(served, names, error, match):
    with pytest.raises(error, match=match):
        with mixed_batch(served, names):
            pass


def test_mixed_batch_needs_one_name_per_row_and_eval_mode(served, x):
    with pytest.raises(ValueError, match="adapter_names has 3 names but the batch has 5 rows"):
        with mixed_batch(served, ["pirate", "butler", BASE]):
            run(served, x)
    assert all(layer.row_adapters is None for layer in multi_lora_layers(served).values())
    served.train()
    with pytest.raises(ValueError, match="for inference: call model.eval"):
        with mixed_batch(served, ["pirate"] * 5):
            pass
    with pytest.raises(ValueError, match="model has no adapters"):
        with mixed_batch(nn.Linear(2, 2), ["a"]):
            pass


@pytest.mark.parametrize(
    "name, match",
    [
        ("pirate", r"'pirate' is already on the model .*delete_adapter it first, or hot_swap"),
        (BASE, "is reserved"),
        ("a.b", "letters, digits"),
        ("", "letters, digits"),
        (None, "letters, digits"),
    ],
)
def test_add_rejects_bad_names(served, gpt_dirs, name, match):
    with pytest.raises(ValueError, match=match):
        add_adapter(served, name)
    with pytest.raises(ValueError, match=match):
        load_named_adapter(served, gpt_dirs["poet"], name)


def test_bad_arguments_name_what_is_valid(served):
    with pytest.raises(ValueError, match=r"adapter_name 'x' is not on the model.*'pirate'"):
        set_adapter(served, "x")
    with pytest.raises(ValueError, match=r"adapter_name 'x' is not on the model"):
        delete_adapter(served, "x")
    with pytest.raises(ValueError, match="matched no module; the linear layers are"):
        add_adapter(served, "c", target_modules=["nothing"])
    with pytest.raises(ValueError, match=r"rank must be at most .* = 128 for layer"):
        add_adapter(served, "c", rank=200)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_adapter(served, "c", rank=0)
    with pytest.raises(TypeError, match="adapter_dtype must be None"):
        add_adapter(served, "c", adapter_dtype="fp32")
    with pytest.raises(TypeError, match="matched 'model.norm', a RMSNorm"):
        add_adapter(served, "c", target_modules=["norm"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        set_adapter("model", None)
    assert list_adapters(served) == ("pirate", "butler")  # every refusal changed nothing


def test_a_single_lora_model_is_refused(gpt, gpt_dirs):
    single = apply_lora(copy.deepcopy(gpt), rank=2)
    with pytest.raises(TypeError, match="is a single-adapter LoRALinear"):
        load_named_adapter(single, gpt_dirs["pirate"], "pirate")


def test_an_adapter_for_another_model_is_refused(gpt, gpt_dirs, hf_models):
    base, _ = hf_models["gpt2-fp32"]
    with pytest.raises(ValueError, match="matched no module"):
        load_named_adapter(copy.deepcopy(base), gpt_dirs["pirate"], "pirate")
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear"):
        MultiLoRALinear(nn.Conv2d(2, 2, 1))
