"""Pretrain the shipped tiny GPT on lora_lab's synthetic corpus, reproducibly.

    python scripts/pretrain.py            # writes lora_lab/checkpoints/{tiny_gpt.safetensors,
                                          #   config.json, pretrain_log.json}
    python scripts/pretrain.py --steps 200 --out /tmp/ckpt   # a quick trial elsewhere

Everything is seeded; on the same machine and thread count a rerun gives the same loss.
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.data import (  # noqa: E402
    ANIMALS,
    ATTRIBUTES,
    CORPUS_DESCRIPTION,
    TASKS,
    plain_answer,
    pretraining_corpus,
    prompt_for,
)
from lora_lab.model import CHECKPOINT_DIR, GPT, GPTConfig, save_checkpoint  # noqa: E402
from lora_lab.tokenizer import CharTokenizer  # noqa: E402
from lora_lab.training import evaluate, generate  # noqa: E402

SEED = 0
CORPUS_CHARS = 2_000_000  # training text; a separate 100k-char text (seed 1) measures loss
BATCH_SIZE = 32
LR, MIN_LR, WARMUP = 2e-3, 2e-4, 100  # linear warm-up, then cosine decay to MIN_LR
WEIGHT_DECAY = 0.1
EVAL_BATCHES = 20


def windows(data, starts, T):
    """Inputs and next-token targets, (len(starts), T) each, cut from ``data`` at ``starts``."""
    x = torch.stack([data[s : s + T] for s in starts])
    y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
    return x, y


@torch.no_grad()
def mean_loss(model, data, T, seed):
    """Mean next-token loss over EVAL_BATCHES fixed random windows of ``data``."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for _ in range(EVAL_BATCHES):
        starts = torch.randint(len(data) - T - 1, (BATCH_SIZE,), generator=gen).tolist()
        x, y = windows(data, starts, T)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step, steps):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def fact_accuracy(model):
    """Share of all world facts the model answers exactly, in the corpus's plain style."""
    from lora_lab.data import Task

    pairs = tuple((prompt_for(a, k), plain_answer(a, k)) for a in ANIMALS for k in ATTRIBUTES)
    return evaluate(model, Task("plain", "plain answers", pairs, pairs), split="test")


def write_json(obj, path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)  # the shipped checkpoint's steps
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (on a CPU shared with other jobs, 1 can be much faster)",
    )
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    tok = CharTokenizer()
    config = GPTConfig()
    T = config.block_size
    train_data = torch.tensor(tok.encode(pretraining_corpus(CORPUS_CHARS, seed=SEED)))
    val_data = torch.tensor(tok.encode(pretraining_corpus(100_000, seed=SEED + 1)))

    model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    random_loss = mean_loss(model, val_data, T, seed=SEED)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY
    )
    gen = torch.Generator().manual_seed(SEED)
    curve = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps)
        starts = torch.randint(len(train_data) - T - 1, (BATCH_SIZE,), generator=gen).tolist()
        x, y = windows(train_data, starts, T)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            curve.append({"step": step, "train_loss": round(loss.item(), 4)})
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s")
    wall = time.perf_counter() - t0

    model.eval()
    prompts = ["the fox", "q: where does the owl live?\na:", "q: what does the bear eat?\na:"]
    log = {
        "seed": SEED,
        "data": CORPUS_DESCRIPTION,
        "train_chars": len(train_data),
        "val_chars": len(val_data),
        "config": asdict(config),
        "params": n_params,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "tokens_seen": args.steps * BATCH_SIZE * T,
        "lr": {"peak": LR, "min": MIN_LR, "warmup": WARMUP, "schedule": "cosine"},
        "weight_decay": WEIGHT_DECAY,
        "threads": args.threads,
        "wall_time_s": round(wall, 1),
        "cpu_load_avg_1_5_15min": {  # other jobs sharing the CPU slow the wall time down
            "start": load_before,
            "end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "final_train_loss": curve[-1]["train_loss"],
        "val_loss": round(mean_loss(model, val_data, T, seed=SEED), 4),
        "random_init_val_loss": round(random_loss, 4),
        "uniform_loss": round(math.log(config.vocab_size), 4),
        "plain_fact_accuracy": fact_accuracy(model),
        "task_floor": {name: evaluate(model, name) for name in TASKS},
        "samples": {
            p: generate(model, p, max_new_tokens=150, temperature=0.8, stop=None, seed=SEED)
            for p in prompts
        },
        "greedy": {p: generate(model, p, max_new_tokens=80) for p in prompts[1:]},
        "curve": curve,
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out)
    write_json(log, args.out / "pretrain_log.json")
    print(json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
