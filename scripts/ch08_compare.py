"""Chapter 8's comparison, precomputed: LoRA against full fine-tuning over seeds and grids.

    python scripts/ch08_compare.py            # the full run: lora_lab/results/ch08_compare.json
    python scripts/ch08_compare.py --quick    # the same code path at a toy size (tests)
    python scripts/ch08_compare.py --out x.json

On the shipped model, one CPU thread, runs in sequence (so a rerun gives the same numbers):
every method (full fine-tuning; LoRA rank 8 on the attention projections; LoRA rank 8 on all
linear layers) on a task close to pretraining (butler) and one far from it (reverse3), at
every learning rate of a grid around each method's usual rate and with three seeds; then, on
the far task, each LoRA method at other ranks (on the same grid of rates, three seeds);
then a training step of each method timed interleaved. The plan is
``lora_lab.experiments.compare_plan``; chapter 8 and the claims page read the file through
``lora_lab.experiments.read_compare`` and judge it with ``lesson_verdicts``.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_lab import load_model, set_seed  # noqa: E402
from lora_lab.experiments import COMPARE_FILE, compare_plan, run_comparison  # noqa: E402
from scripts.precompute import Clock, write_json  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy size: one seed, a few steps")
    parser.add_argument("--out", type=Path, default=None, help=f"default {COMPARE_FILE}")
    args = parser.parse_args(argv)
    out = args.out or COMPARE_FILE
    if args.quick and args.out is None:
        parser.error("--quick needs --out: the committed results are the full run's")

    torch.set_num_threads(1)  # one thread: the same numbers on every rerun, and fair timings
    set_seed(0)
    clock = Clock()
    base, tok = load_model(None, device="cpu")
    plan = compare_plan(base, quick=args.quick)
    results = run_comparison(base, tok, plan, log=lambda line: print(line, flush=True))
    results["meta"] = clock.meta("scripts/ch08_compare.py", args.quick)
    write_json(out, results)
    meta = results["meta"]
    print(
        f"wrote {out}: {len(results['runs'])} runs, {meta['wall_s']} s wall, {meta['cpu_s']} s CPU"
    )


if __name__ == "__main__":
    main()
