"""``python -m lora_lab.finetune``: LoRA or QLoRA fine-tuning from the command line, in one
process or, unchanged, on several under ``torchrun --nproc_per_node=N`` with DDP or FSDP2.

The step is chapter 5's (``lora_lab.training``): AdamW, loss on target tokens, gradients
clipped to norm 1, batches drawn from reshuffled epochs of the task's train split. Every rank
draws the same global batch and trains on its slice; each rank's loss is its share of the
global batch's mean, so the averaged gradients are those of one process on the whole batch.
Rank 0 alone prints progress and saves the adapter (PEFT's format, written whole).

    torchrun --nproc_per_node=2 -m lora_lab.finetune --strategy ddp --steps 20 --output out
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed as D
from .data import TASKS, get_task
from .lora import ALL_LINEAR
from .training import (  # global_batches: train()'s batch order, split over the ranks here
    IGNORE,
    _context_length,
    encode_pairs,
    global_batches,
    logits_of,
    make_batch,
)

METHODS = ("lora", "qlora")
GRAD_CLIP = 1.0  # as lora_lab.train


# ----------------------------------------------------------------------------- the data


def rank_slice(batch_size, world_size, rank):
    """The rows of a global batch of ``batch_size`` that ``rank`` of ``world_size`` trains on."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by world_size={world_size}: every rank "
            "needs the same number of rows"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def target_tokens(examples):
    """How many target tokens (the tokens that carry loss) ``examples`` hold."""
    return sum(len(ids) - n_prompt for ids, n_prompt in examples)


# ----------------------------------------------------------------------------- arguments


def _targets(text):
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"a comma-separated list of module names, got {text!r}")
    return names


def _positive(kind):
    """An argparse type: a finite ``kind`` (int or float) > 0, or an error saying so."""
    what = "an integer >= 1" if kind is int else "a finite number > 0"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser():
    """The command's argument parser (defaults: the shipped model's chapter 5 settings)."""
    from .hub import chosen_model

    p = argparse.ArgumentParser(
        prog="python -m lora_lab.finetune", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default=chosen_model(), help="shipped model, Hub ID or folder")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--task", choices=TASKS, default=TASKS[0])
    p.add_argument("--steps", type=_positive(int), default=None, help="default: by model size")
    p.add_argument("--lr", type=_positive(float), default=None, help="default: by model size")
    p.add_argument("--batch-size", type=_positive(int), default=None, help="global batch")
    p.add_argument("--rank", type=_positive(int), default=8)
    p.add_argument("--alpha", type=_positive(float), default=16)
    p.add_argument(
        "--targets", type=_targets, default=None, help="names, or all-linear (default: attention)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("finetuned-adapter"))
    p.add_argument("--strategy", choices=D.STRATEGIES, default="none")
    p.add_argument("--report", type=Path, default=None, help="folder for one JSON per rank")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args, world):
    """Errors that need more than one argument, or the launcher's environment, to see."""
    if args.strategy == "none" and world.world_size > 1:
        raise ValueError(
            f"--strategy none under a launcher with WORLD_SIZE={world.world_size} would train "
            f"{world.world_size} separate copies; choose --strategy ddp or fsdp"
        )
    if args.strategy != "none" and not world.launched:
        raise ValueError(
            f"--strategy {args.strategy} needs several processes: start the command with "
            f"torchrun --nproc_per_node=N -m lora_lab.finetune (RANK and WORLD_SIZE are unset)"
        )
    if args.batch_size is not None and args.batch_size % world.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by the {world.world_size} "
            "processes: every rank trains on the same number of rows"
        )
    if args.method == "qlora" and args.strategy == "fsdp":
        raise ValueError(
            "--method qlora with --strategy fsdp: lora_lab's QLoRA layer keeps its 4-bit base "
            "in buffers, which FSDP does not shard: every rank would hold the whole base. Use "
            "--strategy ddp, or transformers + bitsandbytes with bnb_4bit_quant_storage"
        )
    out = args.output
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--output {str(out)!r} exists and is not a directory")
    if args.seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {args.seed}")


# ----------------------------------------------------------------------------- the run


@dataclass
class Report:
    """What one rank did: its losses, bytes and time, and a digest of its adapter replica."""

    rank: int
    world_size: int
    strategy: str
    loss: list = field(default_factory=list)  # the global batch's mean target-token loss
    param_bytes: int = 0  # bytes of parameters this rank stores (its shards under FSDP)
    trainable_bytes: int = 0
    adapter_sha256: str = ""  # of this rank's adapter (its replica; under FSDP, gathered)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU seconds


def _adapter_digest(tensors):
    import hashlib

    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapted_model(args, device):
    """The model with LoRA (or QLoRA) adapters, equal on every rank (seeded), and its tokenizer."""
    from .lora import apply_lora
    from .model import load_model
    from .quant import apply_qlora
    from .specs import ModelSpec

    model, tokenizer = load_model(args.model, device=device)
    torch.manual_seed(args.seed)  # lora_A's init: the same draw on every rank
    targets = args.targets or ModelSpec.from_model(model).attention_targets()  # q, k, v, o
    adapt = apply_qlora if args.method == "qlora" else apply_lora
    return adapt(model, args.rank, args.alpha, targets).train(), tokenizer


def _step(model, examples, n_tokens, world, device):
    """Forward and backward on this rank's rows; returns its summed target-token loss."""
    x, y = make_batch(examples, device)
    logits = logits_of(model, x)  # (B / world, T, V)
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    # DDP and FSDP average gradients over ranks: scaled by world_size, the average is the
    # gradient of the global batch's mean
    (loss_sum * (world.world_size / n_tokens)).backward()
    return loss_sum.item()


def train_ranks(args, world, device):
    """Train on this rank's slices; returns ``(model, Report)``."""
    from tqdm.auto import tqdm

    from .hub import train_settings

    model, tokenizer = _adapted_model(args, device)
    settings = train_settings(model)
    steps = args.steps or settings.steps
    lr = args.lr or settings.lr_lora
    batch_size = args.batch_size or settings.batch_size
    rows = rank_slice(batch_size, world.world_size, world.rank)
    examples = encode_pairs(get_task(args.task).train, tokenizer, _context_length(model))
    model = D.wrap(model, args.strategy, device, world.world_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    torch.manual_seed(args.seed + world.rank)  # dropout: one process is lora_lab.train's run
    report = Report(world.rank, world.world_size, args.strategy)
    report.param_bytes, report.trainable_bytes = D.local_param_bytes(model)
    show = world.is_main and not args.quiet
    bar = tqdm(global_batches(len(examples), batch_size, steps, args.seed), disable=not show)
    bar.set_description(f"{args.method} {args.task} ({args.strategy}, {world.world_size} proc)")
    for step, batch in enumerate(bar):
        chosen = [examples[i] for i in batch]
        local = _step(model, chosen[rows], target_tokens(chosen), world, device)
        loss = D.all_sum(local, device) / target_tokens(chosen)  # the same on every rank
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss} at step {step} (of {steps}): training diverged and no "
                "adapter is saved; lower --lr"
            )
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.loss.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    return model, report


def _save(args, model, adapters):
    """Rank 0: write the adapter in PEFT's format (whole or not at all); returns the path."""
    from .adapters import save_adapter

    plain = D.unwrap(model)
    if args.method == "qlora" or args.strategy == "fsdp":
        # save_adapter writes LoRALinear layers, and FSDP's parameters are shards: the gathered
        # adapter goes into the same model rebuilt with LoRA on its float base
        plain, _ = _adapted_model(argparse.Namespace(**{**vars(args), "method": "lora"}), "cpu")
        params = {n: p for n, p in plain.named_parameters() if p.requires_grad}
        if set(params) != set(adapters):
            raise RuntimeError(
                f"the rebuilt model's adapters {sorted(params)[:3]}... are not the trained ones "
                f"{sorted(adapters)[:3]}..."
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(adapters[name])
    return save_adapter(plain, args.output)


def _write_report(folder, report):
    """This rank's report as ``folder/rank<R>.json``, written whole (temp file + rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"rank{report.rank}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=1)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args, world):
    """Train, gather, save on rank 0 and tell every rank how the save went; returns the Report."""
    t0, c0 = time.perf_counter(), time.process_time()
    device = D.device_for(world) if world.launched else _single_device()
    D.start(world, device)
    try:
        model, report = train_ranks(args, world, device)
        adapters = D.gather_trainable(model)  # a collective: every rank takes part
        report.adapter_sha256 = _adapter_digest(adapters)
        D.barrier()  # every rank has finished training before rank 0 writes
        error = None
        if world.is_main:
            try:
                path = _save(args, model, adapters)
                print(f"saved the adapter to {path}", file=sys.stderr)
            except Exception as err:  # told to every rank below, then raised on each
                error = f"{type(err).__name__}: {err}"
        error = D.same_on_all(error)
        if error is not None:
            raise RuntimeError(f"rank 0 could not save the adapter to {args.output}: {error}")
        report.wall_s, report.cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if args.report is not None:
            _write_report(args.report, report)
        return report
    finally:
        D.stop()


def _single_device():
    from .utils import get_device

    return get_device()


def main(argv=None):
    """The command: parse ``argv`` (default ``sys.argv[1:]``), check, run; returns the Report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        world = D.world_from_env()
        check_args(args, world)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2, the message on stderr
    return run(args, world)


if __name__ == "__main__":
    main()
