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
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_lab import load_model, set_seed  # noqa: E402
from lora_lab.experiments import COMPARE_FILE, compare_plan, run_comparison  # noqa: E402


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:  # not available on this OS
        return None


def write_json(path, data):
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    start, cpu, load = time.perf_counter(), time.process_time(), load_average()
    base, tok = load_model(None, device="cpu")
    plan = compare_plan(base, quick=args.quick)
    results = run_comparison(base, tok, plan, log=lambda line: print(line, flush=True))
    results["meta"] = {
        "script": "scripts/ch08_compare.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "model": "lora-lab/tiny-gpt (shipped)",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "load_average_1_5_15min": {"start": load, "end": load_average()},
    }
    write_json(out, results)
    meta = results["meta"]
    print(
        f"wrote {out}: {len(results['runs'])} runs, {meta['wall_s']} s wall, {meta['cpu_s']} s CPU"
    )


if __name__ == "__main__":
    main()
