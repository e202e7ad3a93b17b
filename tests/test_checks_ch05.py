"""Chapter 5's exercise checkers: right answers pass, named slips and wrong answers fail.

The expected values are worked out by hand from the shipped model's config, then confirmed by
measurement (an optimizer step, torch's FLOP counter), so a slip in a checker's formula shows.
"""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lora_lab.checks import ch05 as check
from lora_lab.lora import LoRALinear, apply_lora
from lora_lab.model import load_pretrained
from lora_lab.training import IGNORE, make_batch, train


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(device="cpu")


def lora_numbers_by_hand(config, rank):
    """Trainable numbers and tensors of LoRA on q/k/v/o: each d x d, A (r, d) and B (d, r)."""
    d, layers = config.n_embd, config.n_layer
    return layers * 4 * rank * (d + d), layers * 4 * 2


def test_optimizer_bytes_right(shipped):
    # the shipped model: 4 blocks of width 128, so 4 x 4 layers x 16 x (128 + 128) LoRA numbers
    # in 32 tensors; two float32 moments per number and one float32 step per tensor
    assert (shipped.config.n_layer, shipped.config.n_embd) == (4, 128)
    by_hand = 2 * 4 * 65_536 + 4 * 32
    assert by_hand == 524_416
    assert lora_numbers_by_hand(shipped.config, 16) == (65_536, 32)
    assert check.optimizer_bytes(by_hand).correct
    assert check.optimizer_bytes(float(by_hand)).correct
    numbers8, tensors8 = lora_numbers_by_hand(shipped.config, 8)
    assert check.optimizer_bytes(8 * numbers8 + 4 * tensors8, rank=8).correct


def test_optimizer_bytes_matches_a_measured_step(shipped):
    """The checker's expected value is what lora_lab.train measures after a real AdamW step."""
    model = apply_lora(copy.deepcopy(shipped), rank=16)
    history = train(model, "pirate", steps=1, lr=1e-3, batch_size=2, progress=False)
    assert check.optimizer_bytes(history.memory["optimizer"]).correct


@pytest.mark.parametrize(
    "slip, says",
    [
        (lambda n, t: 8 * n, "step counter"),
        (lambda n, t: 4 * n + 4 * t, "two moments"),
        (lambda n, t: 4 * n, "two moments"),
    ],
)
def test_optimizer_bytes_names_the_slip(shipped, slip, says):
    numbers, tensors = lora_numbers_by_hand(shipped.config, 16)
    result = check.optimizer_bytes(slip(numbers, tensors))
    assert not result.correct and says in result.message


def test_optimizer_bytes_wrong_and_missing(shipped):
    numbers, tensors = lora_numbers_by_hand(shipped.config, 16)
    total = sum(p.numel() for p in shipped.parameters()) + numbers
    result = check.optimizer_bytes(8 * total)
    assert not result.correct and "trainable" in result.message
    assert not check.optimizer_bytes(8 * numbers + 4 * tensors + 4).correct
    assert not check.optimizer_bytes("524416").correct
    result = check.optimizer_bytes(None)
    assert not result.correct and "No answer yet" in result.message


def test_lora_flop_ratio_right_and_wrong():
    by_hand = (4 * 4096**2 + 12 * 4096 * 8) / (6 * 4096**2)
    assert abs(by_hand - 0.670572916) < 1e-9
    assert check.lora_flop_ratio(by_hand).correct
    assert check.lora_flop_ratio(0.67057).correct  # rounded to 5 digits: within 1e-4
    assert check.lora_flop_ratio(2 / 3 + 2 * 16 / 1024, d=1024, r=16).correct
    assert not check.lora_flop_ratio(0.68).correct
    assert not check.lora_flop_ratio(None).correct
    for slip, says in [(2 / 3, "LoRA factors"), (1 - by_hand, "saves"), (1 / 3, "share")]:
        result = check.lora_flop_ratio(slip)
        assert not result.correct and says in result.message


def test_lora_flop_ratio_formula_matches_torch_flop_counter():
    """Count one LoRALinear's training matmuls with torch and compare with the checker's formula."""
    d, r, tokens = 64, 4, 10
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, bias=False)
    lora = LoRALinear(copy.deepcopy(base), rank=r)
    x = torch.randn(tokens, d, requires_grad=True)  # inside a network the input needs a gradient

    def flops(layer):
        with FlopCounterMode(display=False) as counter:
            layer(x).square().sum().backward()
        return counter.get_total_flops()

    assert flops(base) == 6 * tokens * d * d
    assert flops(lora) == tokens * (4 * d * d + 12 * d * r)
    assert check.lora_flop_ratio(flops(lora) / flops(base), d=d, r=r).correct


def test_full_step_flops_matches_torch_flop_counter(shipped):
    """The checker's count is what torch counts for a forward and backward pass of a batch."""
    model = copy.deepcopy(shipped).train().requires_grad_(True)
    B, T = 16, 80
    x = torch.randint(0, model.config.vocab_size, (B, T))
    y = torch.full((B, T), IGNORE)
    y[:, 40:] = x[:, 40:]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE).backward()
    measured = counter.get_total_flops()
    assert check.full_step_flops(measured, batch_size=B, seq_len=T).correct
    c = model.config
    linear = c.n_layer * (4 * c.n_embd**2 + 3 * c.n_embd * c.intermediate_size)
    linear += c.n_embd * c.vocab_size  # lm_head
    assert measured == 6 * B * T * linear


def test_full_step_flops_slips(shipped):
    c = shipped.config
    linear = c.n_layer * (4 * c.n_embd**2 + 3 * c.n_embd * c.intermediate_size)
    head = c.n_embd * c.vocab_size
    tokens = 16 * 80
    assert check.full_step_flops(6 * tokens * (linear + head)).correct
    for answer, says in [
        (2 * tokens * (linear + head), "forward"),
        (4 * tokens * (linear + head), "backward"),
        (6 * tokens * sum(p.numel() for p in shipped.parameters()), "embedding"),
        (6 * tokens * linear, "lm_head"),
    ]:
        result = check.full_step_flops(answer)
        assert not result.correct and says in result.message
    assert not check.full_step_flops(None).correct
    assert not check.full_step_flops(6 * tokens * (linear + head) + 1).correct


def _labels(ids, n_prompt):
    y = ids[:, 1:].clone()
    y[:, : n_prompt - 1] = IGNORE
    return y


def _unshifted(ids, n_prompt):
    """The slip of labels equal to the inputs: each position 'predicts' its own token."""
    y = ids[:, :-1].clone()
    y[:, : n_prompt - 1] = IGNORE
    return y


def _step(model, optimizer, ids, n_prompt, *, labels=_labels, step=True, zero=True):
    """A training step with one of its parts changeable, for the wrong answers below."""
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels(ids, n_prompt).flatten(), ignore_index=IGNORE
    )
    loss.backward()
    if step:
        optimizer.step()
    if zero:
        optimizer.zero_grad()
    return loss.item()


def test_training_step_right_answers_pass():
    assert check.training_step(check.reference_step).correct
    assert check.training_step(_step).correct

    def zero_first_and_slice(model, optimizer, ids, n_prompt):  # same step, written otherwise
        optimizer.zero_grad()
        logits = model(ids[:, :-1])[:, n_prompt - 1 :]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, n_prompt:].reshape(-1))
        loss.backward()
        optimizer.step()
        return loss  # a tensor is accepted

    assert check.training_step(zero_first_and_slice).correct


def test_reference_step_is_the_course_loss():
    """The checker's labels are make_batch's: the same loss as lora_lab.training computes."""
    model, _ = check._step_setup()
    ids = torch.randint(0, 96, check.STEP_BATCH, generator=torch.Generator().manual_seed(1))
    n_prompt = 5
    x, y = make_batch([(row.tolist(), n_prompt) for row in ids], "cpu")
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    _, optimizer = check._step_setup()
    assert check.reference_step(model, optimizer, ids, n_prompt) == expected.item()


@pytest.mark.parametrize(
    "wrong, case, says",
    [
        (partial(_step, labels=lambda ids, n: ids[:, 1:]), 1, "answer tokens only"),  # no mask
        (partial(_step, labels=lambda ids, n: _labels(ids, n + 1)), 1, "-100"),  # off by one
        (partial(_step, labels=_unshifted), 1, "labels ids[:, 1:]"),
        (partial(_step, step=False), 2, "optimizer.step()"),
        (partial(_step, zero=False), 3, "zero_grad"),
    ],
)
def test_training_step_wrong_answers_name_the_case(wrong, case, says):
    result = check.training_step(wrong)
    assert not result.correct and f"case {case} of 4" in result.message and says in result.message


def test_training_step_unanswered_and_bad_return():
    def todo(model, optimizer, ids, n_prompt):
        raise NotImplementedError

    assert "No answer yet" in check.training_step(todo).message
    assert "No answer yet" in check.training_step(None).message
    silent = check.training_step(lambda model, optimizer, ids, n_prompt: None)
    assert not silent.correct and "should return its loss" in silent.message
    assert "should be a function" in check.training_step(3).message
