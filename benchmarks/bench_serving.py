"""Speed of lora_lab's mixed batches next to PEFT's ``adapter_names``, on the shipped model.

Run from the repository root:  python -m benchmarks.bench_serving  (about 40 s on a laptop CPU)

Eight adapters of rank 8 on q/k/v/o (random non-zero weights) sit on one shipped GPT, in
lora_lab.serving and in PEFT. For G = 1, 2, 4, 8 distinct adapters in a batch of 8 sequences,
prints the forward time of each library and their ratio (lower is faster for lora_lab); the
outputs are checked equal first. Timing: lora_lab.measure's interleaved timer and its median.
"""

import argparse
import copy
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402

from lora_lab import apply_lora, save_adapter  # noqa: E402
from lora_lab.measure import compare  # noqa: E402
from lora_lab.model import load_pretrained  # noqa: E402
from lora_lab.serving import load_named_adapter, mixed_batch  # noqa: E402

N_ADAPTERS, RANK = 8, 8


def served_pair(root):
    """The shipped GPT with the same eight adapters in lora_lab and in PEFT."""
    base = load_pretrained(device="cpu")
    ours, theirs = copy.deepcopy(base), None
    for i in range(N_ADAPTERS):
        adapted = apply_lora(copy.deepcopy(base), rank=RANK, alpha=2 * RANK)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        path = str(save_adapter(adapted, root / f"a{i}"))
        load_named_adapter(ours, path, f"a{i}")
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="a0")
        else:
            theirs.load_adapter(path, adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed)")
    parser.add_argument("--samples", type=int, default=31, help="timed samples per side")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (at most 96)")
    args = parser.parse_args(argv)
    if min(args.threads, args.samples, args.batch) < 1 or not 1 <= args.seq <= 96:
        parser.error(f"--threads, --samples, --batch must be >= 1 and --seq 1-96, got {args}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = served_pair(Path(tmp))
    x = torch.randint(0, 96, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for groups in (1, 2, 4, 8):
        names = [f"a{i % groups}" for i in range(args.batch)]

        def run_ours(names=names):
            with torch.no_grad(), mixed_batch(ours, names):
                return ours(x)

        def run_peft(names=names):
            with torch.no_grad():
                return theirs(x, adapter_names=names)

        assert (run_ours() - run_peft()).abs().max() <= 1e-6  # the same outputs first
        t_a, t_b, ratio = compare(run_ours, run_peft, samples=args.samples, warmup=2)
        print(
            f"G={groups}: lora_lab {t_a * 1e3:7.2f} ms   PEFT {t_b * 1e3:7.2f} ms   "
            f"ratio {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
