"""Speed of lora_lab's LoRA next to PEFT's and next to a plain model.

Run from the repository root:  python -m benchmarks.bench_lora  (about 30 s on a laptop CPU)

Prints three ratios (lower is faster):
  1. lora_lab LoRALinear forward+backward time / PEFT's LoRA layer, same shapes and weights;
  2. a merged model's inference time / the plain nn.Linear model it came from;
  3. the overhead of unmerged LoRA at inference, over the plain model.

Timing: lora_lab.measure's interleaved timer (warm-up, then many samples of a few calls each;
the two sides alternate which goes first, so load from other processes hits both alike) and
its one statistic, the median.
"""

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lora_lab.lora import LoRALinear, apply_lora, merge_lora  # noqa: E402
from lora_lab.measure import compare  # noqa: E402


def time_pair(fn_a, fn_b, samples, calls):
    """Median seconds per call of ``fn_a`` and ``fn_b``, and the median of their paired ratios."""
    return compare(fn_a, fn_b, samples=samples, calls=calls, warmup=5)


def layer_pair(d_in, d_out, rank, alpha, use_dora=False):
    """The same nn.Linear wrapped by lora_lab and by PEFT, with equal non-zero A and B
    (and, with ``use_dora``, equal DoRA magnitudes)."""
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(d_in, d_out))
    ours = LoRALinear(copy.deepcopy(net.proj), rank=rank, alpha=alpha, use_dora=use_dora)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], use_dora=use_dora)
    theirs = peft.get_peft_model(net, config).base_model.model.proj
    with torch.no_grad():
        nn.init.normal_(ours.lora_B.weight, std=0.02)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return ours, theirs


def train_step(layer, x):
    """One forward + backward; gradients reset so nothing accumulates."""

    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).sum().backward()  # x needs a gradient too, as inside a network

    return step


def bench_layer(tokens, d_in, d_out, rank, samples, calls):
    ours, theirs = layer_pair(d_in, d_out, rank, alpha=2 * rank)
    x = torch.randn(tokens, d_in, requires_grad=True)  # (tokens, d_in)
    assert torch.equal(ours(x), theirs(x))  # same weights, same result
    return time_pair(train_step(ours, x), train_step(theirs, x), samples, calls)


def mlp(width, depth):
    """A plain stack of nn.Linear layers (with GELU between): the 'base model'."""
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers).eval()


def bench_inference(tokens, width, depth, rank, samples, calls):
    plain = mlp(width, depth)
    lora = apply_lora(copy.deepcopy(plain), rank=rank, alpha=2 * rank, target_modules="all-linear")
    with torch.no_grad():
        for module in lora.modules():
            if isinstance(module, LoRALinear):
                nn.init.normal_(module.lora_B.weight, std=0.02)
    merged = merge_lora(copy.deepcopy(lora))
    x = torch.randn(tokens, width)  # (tokens, width)

    def run(model):
        def call():
            with torch.no_grad():
                model(x)

        return call

    with torch.no_grad():
        assert (merged(x) - lora(x)).abs().max() < 1e-4  # merging keeps the function
    merged_vs_plain = time_pair(run(merged), run(plain), samples, calls)
    lora_vs_plain = time_pair(run(lora), run(plain), samples, calls)
    return merged_vs_plain, lora_vs_plain


def line(name_a, name_b, result):
    t_a, t_b, ratio = result
    return f"{name_a} {t_a * 1e3:7.3f} ms   {name_b} {t_b * 1e3:7.3f} ms   ratio {ratio:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed)")
    parser.add_argument("--samples", type=int, default=61, help="timed samples per side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.samples < 1:
        parser.error(f"--threads and --samples must be >= 1, got {args.threads}, {args.samples}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s); "
        f"ratio = median over {args.samples} interleaved pairs of samples\n"
    )

    print("1. LoRALinear forward+backward, lora_lab / PEFT (goal <= 1.0)")
    for tokens, d, rank, calls in ((64, 256, 8, 20), (512, 1024, 16, 2)):
        result = bench_layer(tokens, d, d, rank, args.samples, calls)
        print(f"   x ({tokens}, {d}), W ({d}, {d}), r={rank:<3}" + line("lora_lab", "PEFT", result))

    tokens, width, depth, rank = 256, 512, 4, 16
    merged, unmerged = bench_inference(tokens, width, depth, rank, args.samples, calls=4)
    print(
        f"\n   inference: {depth} x nn.Linear({width}, {width}) with GELU, x ({tokens}, {width}), "
        f"LoRA r={rank} on every layer, torch.no_grad()"
    )
    print("2. merged model / plain model inference (goal <= 1.02)")
    print("   " + line("merged  ", "plain", merged))
    print("3. unmerged LoRA at inference, over the plain model")
    print(
        "   " + line("unmerged", "plain", unmerged) + f" (overhead {100 * (unmerged[2] - 1):+.1f}%)"
    )


if __name__ == "__main__":
    main()
