"""Chapter 9's hyperparameter grids, precomputed: every run over several seeds, on a task learned.

    python scripts/ch09_grid.py                       # writes lora_lab/results/ch09_grid.json
    python scripts/ch09_grid.py --quick --out x.json  # the same code path at a toy size (tests)
    python scripts/ch09_grid.py --model Qwen/Qwen2.5-0.5B --out lora_lab/results/ch09_grid_qwen.json

Each run fine-tunes a fresh LoRA copy of the model with ``lora_lab.experiments.finetune`` on
chapter 5's task (pirate: the shipped model learns it within ``train_settings``' 60 steps),
changing one knob of the reference setting (rank 8, alpha 16, the attention projections,
alpha/r, no dropout, ``train_settings``' learning rate), for every seed. The grids: rank x
alpha; the learning rate (widened until its best rate has a worse rate on each side); the
target modules at the reference's parameter budget; LoRA dropout; alpha/r against
alpha/sqrt(r) across ranks at the reference's rate, and at ranks 8 and the largest with rates
from a third to three times it (widened in the same way).

On a CPU it runs torch on one thread: on a shared 2-core machine that is several times faster
than two threads, and the results are the same. The file holds raw runs; chapter 9 tabulates.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.precompute import write_json  # noqa: E402

GRID_FILE = ROOT / "lora_lab" / "results" / "ch09_grid.json"
TASK = "pirate"  # chapter 5's task, close to pretraining: learned within the budget
MAX_WIDENINGS = 2  # learning rates added at an edge of the grid, at most, on each side


def round_rate(lr):
    """A learning rate rounded to one significant digit (3e-3 * 10/3 -> 1e-2)."""
    return float(f"{lr:.0e}")


def targets_at_budget(spec, attention):
    """{label: target_modules}: the choices compared at the reference's parameter budget."""
    if spec.naming == "llama":  # q, k, v, o are separate layers
        mlp = [n for n in spec.linear_layers() if n.startswith("mlp.")]
        return {
            "q only": ["q_proj"],
            "q, v": ["q_proj", "v_proj"],
            "q, k, v, o": attention,
            "MLP": mlp,
            "all linear": "all-linear",
        }
    first = attention[0].rsplit(".", 1)[-1]  # Phi-3's qkv_proj, GPT-2's c_attn: q, k, v fused
    return {
        f"{first} only": attention[:1],
        "attention": attention,
        "MLP": [n for n in spec.linear_layers() if n.startswith("mlp.")],
        "all linear": "all-linear",
    }


def plan(base, quick=False):
    """What the grid trains, as a JSON-ready dict; ``quick``: a toy size for tests."""
    from lora_lab import train_settings
    from lora_lab.specs import ModelSpec

    settings, spec = train_settings(base), ModelSpec.from_model(base)
    attention = list(spec.attention_targets())
    choices = targets_at_budget(spec, attention)
    reference_label = next(k for k, v in choices.items() if v == attention)
    lr = settings.lr_lora
    budget = spec.lora_parameters(8, attention)
    ranks_at_budget = {
        label: max(1, min(budget // spec.lora_parameters(1, t), spec.max_rank(t)))
        for label, t in choices.items()
    }
    top = spec.max_rank(attention)
    if quick:
        grids = {
            "rank_alpha": {"rank": [2, 8], "alpha": [16]},
            "lr": [round_rate(lr / 3), lr],
            "targets": {k: ranks_at_budget[k] for k in list(choices)[:2]},
            "dropout": [0.0, 0.1],
            "rules": {"rank": [2, 8]},
            "rules_lr": {"rank": [8], "factor": [1.0]},
        }
    else:
        grids = {
            "rank_alpha": {"rank": [2, 8, 32], "alpha": [8, 16, 32]},
            "lr": [round_rate(lr * f) for f in (0.1, 1 / 3, 1, 10 / 3, 10)],
            "targets": ranks_at_budget,
            "dropout": [0.0, 0.05, 0.1, 0.2],
            "rules": {"rank": [r for r in (2, 8, 32, 128) if r < top] + [top]},
            "rules_lr": {"rank": [8, top], "factor": [1 / 3, 1.0, 10 / 3]},
        }
    return {
        "task": TASK,
        "steps": 2 if quick else settings.steps,
        "batch_size": settings.batch_size,
        "seeds": [0] if quick else [0, 1, 2],
        "lr": lr,
        "budget": budget,
        "reference": {
            "rank": 8,
            "alpha": 16,
            "targets": reference_label,
            "use_rslora": False,
            "dropout": 0.0,
            "lr": lr,
        },  # fmt: skip
        "targets": choices,
        "grids": grids,
        "max_widenings": 0 if quick else MAX_WIDENINGS,
    }


class Grid:
    """Runs settings (the reference with some knobs changed) once per seed, each only once."""

    def __init__(self, base, tokenizer, the_plan, log=print, reuse=()):
        self.base, self.tok, self.plan, self.log = base, tokenizer, the_plan, log
        self.runs = {}  # setting key -> record
        self.reuse = {self.key(r): r for r in reuse}  # earlier runs of the same plan

    def key(self, setting):
        return json.dumps(
            {k: setting[k] for k in (*self.plan["reference"], "seed")}, sort_keys=True
        )

    def setting(self, **change):
        s = {**self.plan["reference"], **change}
        if "lr" in change:
            s["lr"] = round_rate(s["lr"]) if s["lr"] != self.plan["lr"] else s["lr"]
        return s

    def run(self, **change):
        """Train ``change`` (applied to the reference) for every seed; return the records."""
        from lora_lab.experiments import finetune

        s = self.setting(**change)
        out = []
        for seed in self.plan["seeds"]:
            key = self.key({**s, "seed": seed})
            if key not in self.runs and key in self.reuse:
                self.runs[key] = self.reuse[key]
            if key not in self.runs:
                lora = {"rank": s["rank"], "alpha": s["alpha"], "use_rslora": s["use_rslora"],
                        "dropout": s["dropout"],
                        "target_modules": self.plan["targets"][s["targets"]]}  # fmt: skip
                record = {**s, "seed": seed, "diverged": False}
                try:
                    run = finetune(self.base, self.plan["task"], self.plan["steps"], s["lr"],
                                   lora=lora, batch_size=self.plan["batch_size"], seed=seed,
                                   tokenizer=self.tok)  # fmt: skip
                except FloatingPointError:  # diverged: the worst result a rate can have
                    record.update(diverged=True, train_loss=None, test_loss=None)
                else:
                    record.update(
                        trainable=run.trainable_params,
                        train_loss=run.final_train_loss(),
                        loss_curve=[round(v, 5) for v in run.history.loss],
                        test_loss=run.scores["loss"],
                        test_char_acc=run.scores["char_acc"],
                        test_exact=run.scores["exact"],
                    )
                self.runs[key] = record
                self.log(f"{len(self.runs):>3} {key}: train {record['train_loss']}, "
                         f"test {record.get('test_loss')}")  # fmt: skip
            out.append(self.runs[key])
        return out

    def mean_train_loss(self, lr, **change):
        records = self.run(lr=lr, **change)
        if any(r["diverged"] for r in records):
            return math.inf
        return sum(r["train_loss"] for r in records) / len(records)

    def lr_grid(self, rates, **change):
        """Rates for ``change``, widened at an edge while the best rate (by mean training loss
        over seeds) sits there: each kept rate has been trained for every seed."""
        rates = sorted(rates)
        for _ in range(self.plan["max_widenings"]):
            loss = {lr: self.mean_train_loss(lr, **change) for lr in rates}
            best = min(rates, key=loss.get)  # ties: the smaller rate
            if best == rates[0]:
                rates.insert(0, round_rate(rates[0] / 3))
            elif best == rates[-1]:
                rates.append(round_rate(rates[-1] * 10 / 3))
            else:
                break
        for lr in rates:  # a widening added last is trained too
            self.run(lr=lr, **change)
        return rates


def run_grid(base, tokenizer, the_plan, log=print, reuse=()):
    """Train everything ``the_plan`` asks for; return the plan with its runs and final grids.

    ``reuse``: runs of an earlier result of the same plan, taken instead of training again
    (a CPU run repeats bit for bit, so this only saves time).
    """
    grid, g = Grid(base, tokenizer, the_plan, log, reuse), the_plan["grids"]
    grid.run()  # the reference, every seed
    for rank in g["rank_alpha"]["rank"]:
        for alpha in g["rank_alpha"]["alpha"]:
            grid.run(rank=rank, alpha=alpha)
    g["lr"] = grid.lr_grid(g["lr"])
    for label, rank in g["targets"].items():
        grid.run(targets=label, rank=rank)
    for p in g["dropout"]:
        grid.run(dropout=p)
    for rank in g["rules"]["rank"]:
        for rs in (False, True):
            grid.run(rank=rank, use_rslora=rs)
    g["rules_lr"]["rates"] = [
        {"rank": rank, "use_rslora": rs, "lr": grid.lr_grid(
            [the_plan["lr"] * f for f in g["rules_lr"]["factor"]], rank=rank, use_rslora=rs)}
        for rank in g["rules_lr"]["rank"] for rs in (False, True)
    ]  # fmt: skip
    return {**the_plan, "runs": list(grid.runs.values())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a toy size: the code path only")
    parser.add_argument("--model", default=None, help="default: chosen_model()")
    parser.add_argument("--out", type=Path, default=GRID_FILE)
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier result of the same plan: its runs are not trained again",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lora_lab import chosen_model, get_device, load_model, set_seed

    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    model = args.model or chosen_model()
    set_seed(0)
    base, tok = load_model(model, device=device)
    the_plan, reuse = plan(base, quick=args.quick), []
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text(encoding="utf-8"))
        same = ("task", "steps", "batch_size", "reference", "targets", "quick", "model")
        if any(
            earlier.get(k) != {**the_plan, "quick": args.quick, "model": model}[k] for k in same
        ):
            raise SystemExit(f"{args.reuse} was run with another plan: train from scratch")
        reuse = earlier["runs"]
    result = run_grid(base, tok, the_plan, reuse=reuse)
    result.update(
        script="scripts/ch09_grid.py",
        quick=args.quick,
        model=model,
        environment={"torch": torch.__version__, "device": device.type},
    )
    write_json(args.out, result)  # whole or not at all
    print(f"wrote {args.out}: {len(result['runs'])} runs")


if __name__ == "__main__":
    main()
