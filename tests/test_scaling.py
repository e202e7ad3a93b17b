"""lora_lab.scaling: the update after a few optimizer steps, checked against formulas computed
here from the gradient and A (not with the module's own arithmetic)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from lora_lab import LoRALinear, load_model, set_seed
from lora_lab.scaling import RULES, UpdateSize, linear_task, rank_sweep, task_loss, update_size


@pytest.fixture
def setup():
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 48, generator=gen) / 4
    return layer, linear_task(layer, delta, batch_size=16)


def by_hand(layer, loss_fn, rank, alpha, rule):
    """G = dL/dW on batch 0, A as update_size draws it, and the scaling."""
    set_seed(0)
    lora = LoRALinear(copy.deepcopy(layer), rank=rank, alpha=alpha, use_rslora=RULES[rule])
    W = lora.base_layer.weight.detach().clone()
    plain = nn.Linear(48, 32)  # a plain layer with weight W, to get dL/dW by autograd
    with torch.no_grad():
        plain.bias.copy_(lora.base_layer.bias)
    plain.weight = nn.Parameter(W)
    loss_fn(plain, 0).backward()
    return plain.weight.grad, lora.lora_A.weight.detach(), lora.scaling


@pytest.mark.parametrize("rule", list(RULES))
def test_adamw_first_step_is_lr_times_the_sign(setup, rule):
    layer, loss_fn = setup
    G, A, s = by_hand(layer, loss_fn, rank=4, alpha=8, rule=rule)
    u = update_size(layer, loss_fn, rank=4, alpha=8, rule=rule, lr=1e-3)
    assert isinstance(u, UpdateSize) and u.scaling == s and u.steps == 1
    assert math.isclose(u.b_rms, 1e-3, rel_tol=1e-3)  # every entry of B moved by lr
    GA = G @ A.T  # (out, r): B's gradient is s * GA
    assert math.isclose(u.along_gradient, s * 1e-3 * GA.abs().sum().item() / G.norm().item(),
                        rel_tol=1e-3)  # fmt: skip
    assert math.isclose(u.norm, (s * 1e-3 * torch.sign(GA) @ A).norm().item(), rel_tol=1e-3)
    assert u.loss_after < u.loss_before


def test_sgd_first_step_is_lr_times_the_gradient(setup):
    layer, loss_fn = setup
    G, A, s = by_hand(layer, loss_fn, rank=4, alpha=8, rule="alpha/r")
    u = update_size(layer, loss_fn, rank=4, alpha=8, lr=0.5, optimizer="sgd")
    delta_B = -0.5 * s * G @ A.T  # (out, r)
    assert math.isclose(u.b_rms, delta_B.pow(2).mean().sqrt().item(), rel_tol=1e-4)
    assert math.isclose(u.along_gradient, -(G * (s * delta_B @ A)).sum().item() / G.norm().item(),
                        rel_tol=1e-4)  # fmt: skip


def test_the_layer_is_left_alone_and_runs_repeat(setup):
    layer, loss_fn = setup
    before = copy.deepcopy(layer.state_dict())
    a = update_size(layer, loss_fn, rank=2, steps=3)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(p.requires_grad for p in layer.parameters()) and not isinstance(layer, LoRALinear)
    assert update_size(layer, loss_fn, rank=2, steps=3) == a


def test_rank_one_is_the_same_under_both_rules_and_rslora_is_a_larger_alpha(setup):
    layer, loss_fn = setup
    one = rank_sweep(layer, loss_fn, [1], steps=2)
    assert one[0].row() | {"rule": "x"} == one[1].row() | {"rule": "x"}
    rs = update_size(layer, loss_fn, rank=4, alpha=8, rule="alpha/sqrt(r)", steps=3)
    std = update_size(layer, loss_fn, rank=4, alpha=16, steps=3)  # 8 * sqrt(4)
    assert rs.row() | {"rule": "x"} == std.row() | {"rule": "x"}


def test_rank_sweep_order_and_rules(setup):
    layer, loss_fn = setup
    out = rank_sweep(layer, loss_fn, [1, 2], rules=["alpha/sqrt(r)"])
    assert [(u.rule, u.rank) for u in out] == [("alpha/sqrt(r)", 1), ("alpha/sqrt(r)", 2)]


def test_on_the_shipped_model_with_a_task_and_a_probe():
    model, tok = load_model(None)
    loss_fn = task_loss("pirate", tok, batch_size=4)
    probe = torch.tensor([tok.encode("q: where does the fox live?\na:")])
    u = update_size(model, loss_fn, rank=2, steps=2, lr=1e-3, probe=probe)
    assert u.output_change > 0 and u.norm > 0 and u.loss_after < u.loss_before
    assert update_size(model, loss_fn, rank=2, steps=2, lr=1e-3).output_change is None


def test_task_loss_draws_batches_as_train_does():
    import torch.nn.functional as F

    from lora_lab import get_task
    from lora_lab.training import IGNORE, encode_pairs, logits_of, make_batch

    model, tok = load_model(None)
    loss_fn = task_loss("pirate", tok, batch_size=8, seed=3)
    examples = encode_pairs(get_task("pirate").train, tok)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(3)).tolist()

    def loss_of(indices):
        x, y = make_batch([examples[i] for i in indices], "cpu")
        return F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    with torch.no_grad():
        first, second, again = loss_fn(model, 0), loss_fn(model, 1), loss_fn(model, 0)
        assert torch.equal(first, loss_of(order[:8])) and torch.equal(second, loss_of(order[8:16]))
    assert torch.equal(again, first)  # the same step, the same batch


def test_bad_arguments(setup):
    layer, loss_fn = setup
    with pytest.raises(ValueError, match="rule must be one of"):
        update_size(layer, loss_fn, rank=2, rule="standard")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        update_size(layer, loss_fn, rank=2, optimizer="adam")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        update_size(layer, loss_fn, rank=2, steps=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        update_size(layer, loss_fn, rank=2, lr=float("nan"))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        update_size(layer, loss_fn, rank=0)
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        update_size(layer, "mse", rank=2)
    with pytest.raises(TypeError, match="probe must be a tensor"):
        update_size(layer, loss_fn, rank=2, probe=[1, 2])
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        update_size(layer, lambda m, step: m(torch.ones(2, 48)), rank=2)
    with pytest.raises(FloatingPointError, match="the loss is"):
        update_size(layer, lambda m, step: m(torch.ones(1, 48)).sum() * float("inf"), rank=2)
    with pytest.raises(ValueError, match="ranks must be a non-empty list"):
        rank_sweep(layer, loss_fn, [])
    with pytest.raises(
        ValueError, match=r"delta must be a tensor of base's weight shape \(32, 48\)"
    ):
        linear_task(layer, torch.zeros(48, 32))
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        linear_task(nn.ReLU(), torch.zeros(1))
