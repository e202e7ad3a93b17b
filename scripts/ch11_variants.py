"""Chapter 11's comparison, precomputed: LoRA's variants over seeds and learning-rate grids.

    python scripts/ch11_variants.py            # the full run: lora_lab/results/ch11_variants.json
    python scripts/ch11_variants.py --quick --out x.json   # the same code path at a toy size

On the shipped model, one CPU thread, runs in sequence (a rerun gives the same numbers): LoRA,
rsLoRA, DoRA, PiSSA and LoRA+ (ratio 16) at rank 8 on all linear layers, on chapter 8's far
task, at five learning rates each and three seeds; then LoRA+ at ratios 2, 4, 8 and 32. The
plan is ``lora_lab.beyond.variants_plan``; chapter 11 reads the file with ``read_variants``.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_lab import load_model, set_seed  # noqa: E402
from lora_lab.beyond import VARIANTS_FILE, run_variants, variants_plan  # noqa: E402
from scripts.precompute import Clock, write_json  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy size: one seed, a few steps")
    parser.add_argument("--out", type=Path, default=None, help=f"default {VARIANTS_FILE}")
    args = parser.parse_args(argv)
    out = args.out or VARIANTS_FILE
    if args.quick and args.out is None:
        parser.error("--quick needs --out: the committed results are the full run's")

    torch.set_num_threads(1)  # one thread: the same numbers on every rerun
    set_seed(0)
    clock = Clock()
    base, tok = load_model(None, device="cpu")
    plan = variants_plan(base, quick=args.quick)
    results = run_variants(base, tok, plan, log=lambda line: print(line, flush=True))
    results["meta"] = clock.meta("scripts/ch11_variants.py", args.quick)
    write_json(out, results)
    meta = results["meta"]
    print(
        f"wrote {out}: {len(results['runs'])} runs, {meta['wall_s']} s wall, {meta['cpu_s']} s CPU"
    )


if __name__ == "__main__":
    main()
