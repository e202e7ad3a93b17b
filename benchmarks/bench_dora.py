"""DoRA's and LoRA's training-step time, lora_lab next to PEFT, in one run.

Run from the repository root:  python -m benchmarks.bench_dora  (about 40 s on a laptop CPU)

For each layer shape it times one forward + backward of four layers holding the same weights:
lora_lab LoRA, PEFT LoRA, lora_lab DoRA, PEFT DoRA, and prints
  1. lora_lab / PEFT for LoRA and for DoRA (goal <= 1.0: the course's layer is not slower);
  2. DoRA / LoRA for each library: what DoRA's weight norm costs. Every step, DoRA forms
     W + s B A (out x in) and its row norms, which LoRA never does, so its extra cost grows
     with the layer's size, not with the number of tokens.

Timing: lora_lab.measure's interleaved timer, the median of paired ratios.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_lora import layer_pair, train_step  # noqa: E402
from lora_lab.measure import compare  # noqa: E402


def bench(tokens, d, rank, samples, calls):
    x = torch.randn(tokens, d, requires_grad=True)  # (tokens, d)
    steps = {}
    for use_dora in (False, True):
        ours, theirs = layer_pair(d, d, rank, 2 * rank, use_dora)
        with torch.no_grad():
            err = (ours(x) - theirs(x)).abs().max() / theirs(x).abs().max()
        assert err < 1e-6, f"the two layers disagree ({err:.2g}): nothing to compare"
        steps[use_dora] = (train_step(ours, x), train_step(theirs, x))
    timing = {"samples": samples, "calls": calls, "warmup": 5}
    return {
        "LoRA, lora_lab / PEFT": compare(*steps[False], **timing),
        "DoRA, lora_lab / PEFT": compare(*steps[True], **timing),
        "lora_lab, DoRA / LoRA": compare(steps[True][0], steps[False][0], **timing),
        "PEFT, DoRA / LoRA": compare(steps[True][1], steps[False][1], **timing),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed)")
    parser.add_argument("--samples", type=int, default=41, help="timed samples per side")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.samples < 1:
        parser.error(f"--threads and --samples must be >= 1, got {args.threads}, {args.samples}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s); "
        f"ratio = median over {args.samples} interleaved pairs of samples"
    )
    for tokens, d, rank, calls in ((64, 256, 8, 10), (512, 1024, 16, 1), (32, 1024, 16, 4)):
        print(f"\nx ({tokens}, {d}), W ({d}, {d}), r={rank}: forward + backward")
        for name, (t_a, t_b, ratio) in bench(tokens, d, rank, args.samples, calls).items():
            print(f"  {name:24s} {t_a * 1e3:8.3f} ms / {t_b * 1e3:8.3f} ms = {ratio:.3f}")


if __name__ == "__main__":
    main()
