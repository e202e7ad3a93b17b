"""lora_lab.updates: each measure on matrices whose answer is known by hand."""

import math

import pytest
import torch
import torch.nn as nn

from lora_lab import GPT, GPTConfig, apply_lora
from lora_lab.lora import LoRALinear, lora_layers
from lora_lab.specs import ModelSpec
from lora_lab.updates import (
    adam_step_sizes,
    amplification_factor,
    block_and_module,
    chance_similarity,
    compare_with_weight,
    delta_of,
    largest_steps,
    projection_norm,
    random_projection_norm,
    relative_update,
    subspace_similarity,
    top_directions,
    weight_of,
)

W_DIAG = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64))


def unit(i, d=6):
    e = torch.zeros(d, 1, dtype=torch.float64)
    e[i] = 1.0
    return e


def test_amplification_along_strong_and_weak_directions_of_w():
    on_top = 2 * unit(0) @ unit(0).T  # the update acts where W is 5
    assert amplification_factor(W_DIAG, on_top, 1) == pytest.approx(2 / 5)
    on_weakest = 3 * unit(5) @ unit(5).T  # where W is 0.5
    assert amplification_factor(W_DIAG, on_weakest, 1) == pytest.approx(3 / 0.5)


def test_amplification_keeps_only_the_top_r_directions_and_the_full_norm():
    delta = 3 * unit(1) @ unit(1).T + unit(4) @ unit(4).T  # singular values 3 and 1
    assert amplification_factor(W_DIAG, delta, 1) == pytest.approx(math.sqrt(10) / 4)
    assert amplification_factor(W_DIAG, delta, 2) == pytest.approx(math.sqrt(10) / math.sqrt(17))


def test_amplification_uses_left_vectors_on_the_left_and_right_on_the_right():
    W = W_DIAG.clone()
    W[0, 2] = 0.5  # acts from input 2 into output 0
    delta = 2 * unit(0) @ unit(2).T  # the same pair of directions
    assert amplification_factor(W, delta, 1) == pytest.approx(2 / 0.5)


def test_projection_on_w_own_directions_holds_its_top_singular_values():
    U, V = top_directions(W_DIAG, 2)
    assert projection_norm(W_DIAG, U, V) == pytest.approx(math.sqrt(25 + 16))


def test_random_projection_matches_r_squared_over_dout_din():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    r = 4
    rms = r * torch.linalg.matrix_norm(W).item() / math.sqrt(40 * 24)
    mean = random_projection_norm(W, r, trials=400, generator=gen)
    assert mean == pytest.approx(rms, rel=0.05)  # the mean norm sits just under the rms one
    assert mean < rms


def test_subspace_similarity_against_the_definition_and_chance():
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(16, 3, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(16, 5, generator=gen, dtype=torch.float64))[0]
    phi = subspace_similarity(U, V)
    assert phi.shape == (3, 5)
    direct = (U[:, :2].T @ V[:, :4]).square().sum() / 2
    assert phi[1, 3].item() == pytest.approx(direct.item(), rel=1e-12)
    assert subspace_similarity(U, U).diagonal().allclose(torch.ones(3, dtype=torch.float64))
    chance = chance_similarity(16, 2, 4)
    assert chance.tolist() == [[1 / 16, 2 / 16, 3 / 16, 4 / 16], [2 / 16, 2 / 16, 3 / 16, 4 / 16]]


def test_layer_helpers_on_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = LoRALinear(nn.Linear(6, 4, bias=False), rank=2, alpha=4)
    conv = LoRALinear(Conv1D(4, 6), rank=2, alpha=4)  # weight stored (in, out) = (6, 4)
    for layer in (linear, conv):
        nn.init.normal_(layer.lora_B.weight)
        assert weight_of(layer).shape == (4, 6)
        assert torch.allclose(delta_of(layer), layer.delta_weight().double(), atol=1e-6)
    row = compare_with_weight(linear, trials=5, generator=torch.Generator().manual_seed(0))
    assert row["amplification"] == pytest.approx(row["||dW||_F"] / row["dW's directions"])
    assert row["dW's directions"] <= row["W's directions"] + 1e-12  # W's own are the best r


def test_relative_update_table_and_names():
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig()), rank=2, target_modules="all-linear")
    table = relative_update(model)
    assert table.shape == (4, 7) and (table.to_numpy() == 0).all()  # B = 0: no update yet
    layer = lora_layers(model)["model.layers.2.mlp.down_proj"]
    nn.init.normal_(layer.lora_B.weight)
    expected = (delta_of(layer).norm() / layer.base_layer.weight.double().norm()).item()
    assert relative_update(model).loc[2, "down_proj"] == pytest.approx(expected)
    spec = ModelSpec.from_model(model)
    assert block_and_module(spec, "model.layers.3.self_attn.q_proj") == (3, "q_proj")
    gpt2 = ModelSpec.from_config("gpt2")
    assert block_and_module(gpt2, "transformer.h.1.mlp.c_proj") == (1, "mlp.c_proj")
    assert block_and_module(gpt2, "transformer.h.1.mlp.c_fc") == (1, "c_fc")
    with pytest.raises(ValueError, match="is no linear layer of a block"):
        block_and_module(spec, "lm_head")


def test_adam_step_sizes():
    assert adam_step_sizes([1.0] * 20) == pytest.approx([1.0] * 20)  # steady gradient: lr
    flipping = adam_step_sizes([(-1.0) ** t for t in range(50)])
    assert flipping[0] == pytest.approx(1.0) and flipping[-1] < 0.1  # momentum cancels out
    spike = adam_step_sizes([0.0] * 5_000 + [1.0])[-1]  # Kingma and Ba's sparse case
    assert spike == pytest.approx(0.1 / math.sqrt(0.001), rel=5e-3)
    assert max(adam_step_sizes([1.1**t for t in range(300)])) > spike  # growth goes beyond


def test_largest_steps_records_each_step():
    p = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=0.5)
    with largest_steps([p]) as steps:
        for g in (1.0, 4.0):
            p.grad = torch.tensor([g, -g / 2, 0.0])
            optimizer.step()
    optimizer.step()  # outside the block: not recorded
    assert steps == [0.5, 2.0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="M must be a 2-D floating-point tensor"):
        top_directions(torch.ones(3), 1)
    with pytest.raises(ValueError, match="r must be an integer from 1 to 6, got 7"):
        amplification_factor(W_DIAG, W_DIAG, 7)
    with pytest.raises(ValueError, match="must match"):
        amplification_factor(W_DIAG, W_DIAG[:3], 1)
    with pytest.raises(ValueError, match="U must have W's 6 rows"):
        projection_norm(W_DIAG, torch.ones(5, 1, dtype=torch.float64), unit(0))
    with pytest.raises(ValueError, match="trials must be an int >= 1"):
        random_projection_norm(W_DIAG, 1, trials=0)
    with pytest.raises(ValueError, match="same space"):
        subspace_similarity(unit(0), unit(0, d=5))
    with pytest.raises(TypeError, match="layer must be a lora_lab LoRALinear, got Linear"):
        delta_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        relative_update(GPT(GPTConfig()))
    with pytest.raises(ValueError, match="gradients must hold at least one number"):
        adam_step_sizes([])
    with pytest.raises(ValueError, match="params must be a non-empty iterable"):
        with largest_steps([]):
            pass
