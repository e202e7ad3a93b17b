"""Fine-tune on a task, sample text, and score exact match: one loop for every chapter.

Works unchanged on CPU, CUDA and MPS (it uses the model's own device), and with both the
shipped GPT and a transformers causal LM (logits are taken from ``out.logits`` there).
"""

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import as_task
from .hub import HALF
from .measure import measure_state_bytes, peak_rss_bytes, sync
from .validate import finite_number, int_at_least, module_with_parameters
from .variants import create_loraplus_optimizer

IGNORE = -100  # label of positions that carry no loss (prompt and padding)


# ---------------------------------------------------------------- small helpers


def _device(model):
    return next(model.parameters()).device


def _config(model):
    """The config of the shipped GPT or a transformers model, looking through PEFT wrappers."""
    base = getattr(model, "base_model", None)
    for m in (model, base, getattr(base, "model", None)):
        config = getattr(m, "config", None)
        if config is not None:
            return config
    return None


def _context_length(model):
    from .model import GPTConfig

    config = _config(model)
    if isinstance(config, GPTConfig):
        return config.block_size
    return getattr(config, "max_position_embeddings", None)


def _tokenizer(model, tokenizer):
    """The tokenizer to use: the given one, or the CharTokenizer for the shipped GPT."""
    from .model import GPTConfig
    from .tokenizer import CharTokenizer

    if tokenizer is not None:
        if not all(callable(getattr(tokenizer, m, None)) for m in ("encode", "decode")):
            raise TypeError(f"tokenizer needs encode() and decode() methods, got {tokenizer!r}")
        return tokenizer
    if isinstance(_config(model), GPTConfig):
        return CharTokenizer()
    raise ValueError(
        "tokenizer is None but model is not the shipped GPT; pass the tokenizer that "
        "load_model() returned with it"
    )


def _check_not_merged(model):
    """A merged LoRA layer computes with its base weight alone: its adapter would not train."""
    from .lora import lora_layers

    merged = [name for name, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(
            f"model has merged LoRA layers ({merged[:3]}{'...' if len(merged) > 3 else ''}): "
            "their lora_A and lora_B get no gradient while merged; call unmerge() on them first"
        )


def logits_of(model, idx):
    """Logits (B, T, V) of ``model`` on ``idx`` (B, T), whether it returns a tensor or an output."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def encode_pairs(pairs, tokenizer, max_len=None):
    """(prompt, target) pairs -> list of (token ids of prompt + target, number of prompt ids)."""
    examples = []
    for prompt, target in pairs:
        p, t = tokenizer.encode(prompt), tokenizer.encode(target)
        if not p or not t:
            raise ValueError(f"empty prompt or target in pair {(prompt, target)!r}")
        if max_len is not None and len(p) + len(t) - 1 > max_len:
            raise ValueError(
                f"pair {(prompt, target)!r} is {len(p) + len(t)} tokens, longer than the "
                f"model's context of {max_len} (+1)"
            )
        examples.append((p + t, len(p)))
    return examples


def make_batch(examples, device):
    """Right-padded inputs x (B, T) and labels y (B, T); y is IGNORE outside the targets."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        seq = torch.tensor(ids, dtype=torch.long)
        x[row, : len(ids) - 1] = seq[:-1]
        y[row, n_prompt - 1 : len(ids) - 1] = seq[n_prompt:]  # position j predicts token j+1
    return x.to(device), y.to(device)


# ---------------------------------------------------------------- training


@dataclass
class TrainHistory:
    """What a training run did: loss and seconds per step, and the memory it used."""

    task: str
    steps: int
    lr: float
    batch_size: int
    trainable_params: int
    total_params: int
    loss: list = field(default_factory=list)  # mean target-token loss of each step
    step_time: list = field(default_factory=list)  # seconds of each step
    memory: dict = field(default_factory=dict)  # bytes; see train()

    @property
    def total_time(self):
        return sum(self.step_time)


def global_batches(n_examples, batch_size, steps, seed):
    """The example indices of each step's batch, ``steps`` lists of ``batch_size``.

    Reshuffled epochs of the train split from a generator seeded with ``seed``: when the
    current shuffle runs out, a fresh one refills it. ``train`` trains on these batches, and
    ``python -m lora_lab.finetune`` splits each of them over its ranks (chapter 13).
    """
    int_at_least("n_examples", n_examples)
    int_at_least("batch_size", batch_size)
    int_at_least("steps", steps, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    order, batches = [], []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n_examples, generator=gen).tolist()
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def train(
    model,
    task,
    steps,
    lr,
    batch_size,
    tokenizer=None,
    *,
    weight_decay=0.0,
    grad_clip=1.0,
    seed=0,
    progress=True,
    autocast_dtype=None,
    loraplus_lr_ratio=None,
):
    """Fine-tune the parameters of ``model`` that require grad on ``task``'s train split.

    Trainable parameters must be float32 (the master weights): AdamW's small updates round
    away in a 16-bit weight. A 16-bit model is fine-tuned with a float32 copy and
    ``autocast_dtype`` torch.bfloat16 or torch.float16 (mixed precision: matmuls in 16 bits,
    weights and optimizer in 32); frozen weights may be 16-bit. On CUDA, float16 anywhere in
    the forward pass turns on a gradient scaler, so small gradients do not underflow.

    AdamW, loss on target tokens only, batches drawn from reshuffled epochs. With
    ``loraplus_lr_ratio``, LoRA+: the B side trains at ``lr * loraplus_lr_ratio`` (chapter 11). Seeds torch with
    ``seed`` (dropout) and draws batches from its own generator, so a CPU run is repeatable.
    Returns a TrainHistory whose ``memory`` holds: ``params``, ``grads``, ``optimizer``,
    ``total`` (bytes measured on the tensors after the first step), ``peak_rss`` (the process's
    peak resident memory), on CUDA ``cuda_max_allocated`` and on MPS ``mps_driver_allocated``.
    """
    from tqdm.auto import tqdm

    module_with_parameters("model", model)
    task = as_task(task)
    int_at_least("steps", steps)
    finite_number("lr", lr)
    int_at_least("batch_size", batch_size)
    finite_number("weight_decay", weight_decay, inclusive=True)
    if grad_clip is not None:
        finite_number("grad_clip", grad_clip)
    int_at_least("seed", seed, minimum=0)
    if not task.train:
        raise ValueError(f"task {task.name!r} has an empty train split: nothing to train on")
    _check_not_merged(model)
    tokenizer = _tokenizer(model, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameters with requires_grad=True; nothing to train")
    half = sorted({str(p.dtype) for p in trainable if p.dtype != torch.float32})
    if half:
        raise ValueError(
            f"the trainable parameters are {half}, not float32: AdamW updates smaller than a "
            "16-bit weight's spacing round away. Train a float32 copy (model.float()) with "
            "autocast_dtype=torch.bfloat16 (or torch.float16), or keep LoRA adapters in float32"
        )
    if autocast_dtype is not None and autocast_dtype not in HALF:
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
        )

    device = _device(model)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    fp16 = autocast_dtype == torch.float16 or any(
        p.dtype == torch.float16 for p in model.parameters()
    )
    scaler = torch.amp.GradScaler("cuda", enabled=fp16 and device.type == "cuda")
    examples = encode_pairs(task.train, tokenizer, _context_length(model))
    if loraplus_lr_ratio is None:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = create_loraplus_optimizer(
            model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, loraplus_weight_decay=weight_decay
        )
    history = TrainHistory(
        task=task.name,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
    )
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.train()
    batches = global_batches(len(examples), batch_size, steps, seed)
    bar = tqdm(range(steps), desc=f"train {task.name}", disable=not progress)
    try:
        for step in bar:
            sync(device)
            t0 = time.perf_counter()
            x, y = make_batch([examples[i] for i in batches[step]], device)
            with autocast:
                logits = logits_of(model, x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
            value = loss.item()  # waits for the device
            if not math.isfinite(value):  # stop before a non-finite step reaches the weights
                raise FloatingPointError(
                    f"the loss is {value} at step {step} (of {steps}): training diverged; the "
                    "weights are those after the previous step. Lower the learning rate and start "
                    "again from the weights before this run"
                )
            scaler.scale(loss).backward()  # the identity when the scaler is off
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if step == 0:  # gradients and optimizer state now all exist: measure them
                history.memory.update(measure_state_bytes(model, optimizer))
            optimizer.zero_grad(set_to_none=True)
            history.loss.append(value)
            history.step_time.append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{value:.3f}")
    finally:
        model.train(was_training)  # also when a step fails
    history.memory["peak_rss"] = peak_rss_bytes()
    if device.type == "cuda":
        history.memory["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    elif device.type == "mps":  # MPS keeps no peak counter; this is what its driver holds now
        history.memory["mps_driver_allocated"] = torch.mps.driver_allocated_memory()
    return history


# ---------------------------------------------------------------- sampling and scoring


@torch.no_grad()
def generate(
    model,
    prompt,
    max_new_tokens=60,
    temperature=0.0,
    tokenizer=None,
    *,
    stop="\n",
    seed=0,
):
    """The text ``model`` writes after ``prompt`` (greedy when temperature is 0).

    Stops after ``max_new_tokens`` or once the new text contains ``stop`` (None: never),
    which is kept. A list of prompts gives a list of texts. A prompt longer than the model's
    context is an error, as in training; once prompt and new text outgrow the context, the
    model sees the most recent tokens that fit (a sliding window).
    """
    module_with_parameters("model", model)
    if isinstance(prompt, (list, tuple)):
        return [
            generate(model, p, max_new_tokens, temperature, tokenizer, stop=stop, seed=seed)
            for p in prompt
        ]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str (or a list of them), got {prompt!r}")
    int_at_least("max_new_tokens", max_new_tokens)
    finite_number("temperature", temperature, inclusive=True)
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise ValueError(f"stop must be a non-empty str or None, got {stop!r}")
    int_at_least("seed", seed, minimum=0)
    tokenizer = _tokenizer(model, tokenizer)
    device, context = _device(model), _context_length(model)
    ids = tokenizer.encode(prompt)  # a bad character fails here, before the model changes
    if context and len(ids) > context:
        raise ValueError(
            f"prompt is {len(ids)} tokens, longer than the model's context of {context}"
        )
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    new = []
    try:
        for _ in range(max_new_tokens):
            window = (ids + new)[-context:] if context else ids + new
            logits = logits_of(model, torch.tensor([window], device=device))[0, -1].float()  # (V,)
            if temperature == 0:
                next_id = int(logits.argmax())
            else:
                probs = F.softmax(logits / temperature, dim=-1).cpu()
                next_id = int(torch.multinomial(probs, 1, generator=gen))
            new.append(next_id)
            if stop is not None and stop in tokenizer.decode(new):
                break
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


@torch.no_grad()
def score(model, task, split="test", n=None, tokenizer=None, batch_size=64):
    """Teacher-forced scores on ``task``'s targets: ``loss`` (mean per target token),
    ``char_acc`` (share of target tokens predicted right) and ``exact`` (as ``evaluate``).
    """
    module_with_parameters("model", model)
    task = as_task(task)
    pairs = task.split(split)
    if n is not None:
        int_at_least("n", n)
        if n > len(pairs):
            raise ValueError(f"n={n} is more than the {len(pairs)} pairs in the {split} split")
        pairs = pairs[:n]
    int_at_least("batch_size", batch_size)
    if not pairs:
        raise ValueError(f"task {task.name!r} has an empty {split} split: nothing to score")
    tokenizer = _tokenizer(model, tokenizer)
    device = _device(model)
    examples = encode_pairs(pairs, tokenizer, _context_length(model))
    was_training = model.training
    model.eval()
    loss_sum, right, tokens, exact = 0.0, 0, 0, 0
    try:
        for start in range(0, len(examples), batch_size):
            x, y = make_batch(examples[start : start + batch_size], device)
            logits = logits_of(model, x).float()  # (B, T, V)
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            target = y != IGNORE  # (B, T)
            hit = logits.argmax(dim=-1) == y  # (B, T)
            right += int((hit & target).sum())
            tokens += int(target.sum())
            exact += int((hit | ~target).all(dim=1).sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / tokens, "char_acc": right / tokens, "exact": exact / len(examples)}


def evaluate(model, task, split="test", n=None, tokenizer=None, batch_size=64):
    """Exact-match accuracy of greedy decoding on ``task``'s ``split`` (first ``n`` pairs).

    Greedy decoding writes the target exactly when, given the prompt and the target's earlier
    tokens, every target token is the most likely one. So one teacher-forced forward pass per
    batch gives the same score as decoding token by token, much faster. (Each target ends
    with a newline, so the answer must also stop where the target does.)
    """
    return score(model, task, split, n, tokenizer, batch_size)["exact"]
