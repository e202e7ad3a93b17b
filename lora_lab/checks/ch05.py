"""Checkers for chapter 5, "Training with LoRA"."""

import copy
import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab.checks import Result, check_function, check_number, unanswered

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_number(answer):
    return isinstance(answer, (int, float)) and not isinstance(answer, bool)


def _slip(answer, slips, expected, rel_tol):
    """The message of the first named slip ``answer`` matches (None if it matches none)."""
    if not _is_number(answer):
        return None
    for value, why in slips:
        if not math.isclose(value, expected, rel_tol=rel_tol) and math.isclose(
            answer, value, rel_tol=rel_tol
        ):
            return why
    return None


@lru_cache(maxsize=1)
def _shipped():
    """The shipped GPT on the CPU (only its shapes are read here)."""
    from lora_lab.model import load_pretrained

    return load_pretrained(device="cpu")


def _adamw_step_bytes():
    """Bytes of the ``step`` counter AdamW keeps per tensor: a scalar of the default float."""
    return torch.tensor(0.0).element_size()


def optimizer_bytes(answer, rank=16, target_modules=ATTENTION):
    """Exercise 1: the ``history.memory["optimizer"]`` of LoRA at ``rank`` on the shipped GPT."""
    from lora_lab.lora import apply_lora

    if answer is None:
        return unanswered(
            "count the trainable parameters at this rank; AdamW keeps two numbers "
            "per parameter (exp_avg, exp_avg_sq) plus one step counter per tensor."
        )
    model = apply_lora(copy.deepcopy(_shipped()), rank=rank, target_modules=list(target_modules))
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = sum(2 * p.numel() * p.element_size() for p in trainable)
    steps = len(trainable) * _adamw_step_bytes()
    expected = moments + steps
    full = sum(2 * p.numel() * p.element_size() for p in model.parameters())
    slips = [
        (
            moments,
            f"that is exp_avg and exp_avg_sq. AdamW also keeps a step counter per tensor: "
            f"{len(trainable)} tensors x {_adamw_step_bytes()} bytes.",
        ),
        (moments / 2 + steps, "AdamW keeps two moments per parameter, not one."),
        (moments / 2, "AdamW keeps two moments per parameter, plus a step counter per tensor."),
        (full, "the optimizer only holds the trainable parameters (the LoRA factors)."),
    ]
    why = _slip(answer, slips, expected, rel_tol=1e-9)
    if why:
        return Result(False, f"{answer:,.0f} bytes is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the optimizer state at rank {rank}",
        rel_tol=1e-9,
        why=f"{sum(p.numel() for p in trainable):,} trainable numbers x 2 moments x 4 bytes, "
        f"plus {len(trainable)} step counters of {_adamw_step_bytes()} bytes.",
        hint="each wrapped layer trains A (r x in) and B (out x r); count_parameters gives the "
        "total. Then 2 float32 moments per number and one float32 step per tensor.",
    )


def lora_flop_ratio(answer, d=4096, r=8):
    """Exercise 2: matmul FLOPs of a LoRA training step over a full one, one d x d layer."""
    if answer is None:
        return unanswered(
            "per token, forward W x costs 2d^2; backward costs 2d^2 for the input "
            "gradient and 2d^2 for the weight gradient; add A's and B's matmuls."
        )
    full = 6 * d * d
    lora = 4 * d * d + 12 * d * r  # forward 2d^2 + 4dr, backward 2d^2 + 8dr
    expected = lora / full
    slips = [
        (
            2 / 3,
            "that leaves out the LoRA factors' own matmuls: A and B each cost 2dr forward "
            "and 4dr backward (an input gradient and a weight gradient).",
        ),
        (1 - expected, "that is the share LoRA saves; the question asks for LoRA over full."),
        (
            1 / 3,
            "that is the share the frozen weight gradient would save; the question asks for "
            "LoRA over full, with the LoRA matmuls counted.",
        ),
        (
            (2 * d * d + 4 * d * r) / (2 * d * d),
            "that is the forward pass alone, which LoRA "
            "makes a little dearer; count the backward too.",
        ),
    ]
    why = _slip(answer, slips, expected, rel_tol=1e-4)
    if why:
        return Result(False, f"{answer:.6g} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the FLOP ratio at d={d}, r={r}",
        rel_tol=1e-4,
        why="(4d^2 + 12dr) / 6d^2 = 2/3 + 2r/d: the frozen weight gradient is skipped, but the "
        "forward pass and the input gradient are not, so at best a third is saved.",
        hint="full: 6d^2 per token. LoRA: forward 2d^2 + 4dr, backward 2d^2 (input gradient "
        "through W) + 8dr (weight and input gradients of A and B).",
    )


def full_step_flops(answer, batch_size=16, seq_len=80):
    """Exercise 3: matmul FLOPs of one full fine-tuning step of the shipped GPT on a batch."""
    if answer is None:
        return unanswered(
            "every weight of every nn.Linear costs 2 FLOPs per token forward and "
            "4 backward; count tokens as batch_size x seq_len (padding included)."
        )
    model = _shipped()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    everything = sum(p.numel() for p in model.parameters())
    tokens = batch_size * seq_len
    expected = 6 * tokens * linear
    slips = [
        (2 * tokens * linear, "that is the forward pass; the backward costs twice as much again."),
        (4 * tokens * linear, "that is the backward pass alone; add the forward."),
        (
            6 * tokens * everything,
            "that counts every parameter; the embedding is a table lookup "
            "and the norms' gains are elementwise, not matmuls.",
        ),
        (
            6 * tokens * (linear - model.lm_head.weight.numel()),
            "lm_head is a linear layer too (128 -> 96): count it.",
        ),
    ]
    why = _slip(answer, slips, expected, rel_tol=1e-12)
    if why:
        return Result(False, f"{answer:,.0f} is not it: {why}")
    return check_number(
        answer,
        expected,
        what=f"the matmul FLOPs of one full step on a ({batch_size}, {seq_len}) batch",
        rel_tol=1e-12,
        why=f"6 x {tokens:,} tokens x {linear:,} weights in linear layers.",
        hint="sum the weights of the nn.Linear modules (lm_head included), then 6 FLOPs per "
        "weight per token.",
    )


# Exercise 4: the training step, run on a small GPT of the checker's own (two blocks of width
# 32, LoRA at rank 4 on q, k, v and o) beside a reference step, from the same seed.
STEP_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64}
STEP_BATCH = (4, 12)  # sequences of prompt + answer ids, each 12 long: inputs and labels are 11
STEP_LR = 0.1  # plain SGD: the weights after a step are the weights minus 0.1 x the gradient
STEP_HINTS = {
    "one step: the loss it returns": "The loss is the mean cross-entropy of the answer tokens "
    "only: inputs ids[:, :-1], labels ids[:, 1:] with the positions that predict a prompt "
    "token set to -100 (the first n_prompt - 1 of them).",
    "one step: the LoRA weights after it": "The loss is right but the weights are not: call "
    "loss.backward() and optimizer.step().",
    "three steps: the LoRA weights after them": "One step is right but three are not: clear "
    "the gradients each step (optimizer.zero_grad()), or the next backward adds to them.",
}


def _step_setup(seed=0):
    """The checker's LoRA model (B random, so that every factor moves from the first step) and
    an SGD optimizer over its trainable parameters."""
    from lora_lab.lora import apply_lora, lora_layers
    from lora_lab.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = apply_lora(GPT(GPTConfig(**STEP_MODEL)), rank=4, alpha=8, target_modules=ATTENTION)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.02)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=STEP_LR)
    return model.train(), optimizer


def reference_step(model, optimizer, ids, n_prompt):
    """One training step on ``ids`` (B, T + 1), the first ``n_prompt`` of each row the prompt;
    returns the loss on the answer tokens."""
    from lora_lab.training import IGNORE, logits_of

    x, y = ids[:, :-1], ids[:, 1:].clone()  # position j predicts token j + 1
    y[:, : n_prompt - 1] = IGNORE  # those positions predict prompt tokens
    logits = logits_of(model, x)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def run_steps(step, steps, n_prompt, seed=0):
    """(loss of each step, trainable weights after the last, flattened) of ``step`` run on the
    checker's model and batches from ``seed``."""
    model, optimizer = _step_setup(seed)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, STEP_BATCH, generator=gen)
        loss = step(model, optimizer, ids, n_prompt)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.item()
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"the step should return its loss, a number; it returned {loss!r}.")
        losses.append(float(loss))
    weights = [p.detach().flatten() for p in model.parameters() if p.requires_grad]
    return torch.tensor(losses), torch.cat(weights)


def training_step(fn):
    """Exercise 4: ``fn(model, optimizer, ids, n_prompt)`` against ``reference_step``: the loss
    it returns and the weights after 1 and 3 steps, from the same seed and batches."""
    why = (
        "forward on ids[:, :-1], cross-entropy on the answer tokens only, backward, a step, "
        "gradients cleared: the same losses and weights as the reference, step after step."
    )
    if fn is None or not callable(fn):
        return check_function(fn, [], what="your training step", why=why)
    cases = [
        ("one step: the loss it returns", {"steps": 1, "n_prompt": 5}, 0),
        ("one step: the LoRA weights after it", {"steps": 1, "n_prompt": 5}, 1),
        ("three steps: the LoRA weights after them", {"steps": 3, "n_prompt": 5}, 1),
        ("three steps, a prompt of 8 tokens: each loss", {"steps": 3, "n_prompt": 8}, 0),
    ]
    cases = [
        (label, {**kw, "result": ("losses", "weights")[i]}, run_steps(reference_step, **kw)[i])
        for label, kw, i in cases
    ]

    def learner(steps, n_prompt, result):
        return run_steps(fn, steps, n_prompt)[("losses", "weights").index(result)]

    verdict = check_function(learner, cases, what="your training step", why=why)
    hint = next((h for label, h in STEP_HINTS.items() if f"({label};" in verdict.message), "")
    if verdict.correct or not hint or "): raised " in verdict.message:
        return verdict
    return Result(False, f"{verdict.message} {hint}")
