"""Speed of lora_lab's NF4 next to bitsandbytes', and of a QLoRA step next to a LoRA step.

Run from the repository root:  python -m benchmarks.bench_quant  (about 40 s on a 2-core CPU)

Prints three ratios:
  1. NF4 quantize throughput, lora_lab / bitsandbytes (higher is faster; goal >= 0.5);
  2. NF4 dequantize throughput, lora_lab / bitsandbytes (same);
  3. QLoRALinear training step time / LoRALinear step time on the same layer (lower is faster).

A QLoRA step is slower because the frozen weight lives in 4 bits: every forward pass
dequantizes it, and the backward pass dequantizes it again to send the gradient to the
layer's input, instead of reading a float matrix that is already there.

Timing: lora_lab.measure's interleaved timer (warm-up, then samples of a few calls each; the
two sides alternate which goes first) and its one statistic, the median.
"""

import argparse
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # "kernels" warning

import bitsandbytes.functional as bnb_f  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lora_lab.lora import LoRALinear  # noqa: E402
from lora_lab.measure import compare  # noqa: E402
from lora_lab.quant import QLoRALinear, quantize_nf4  # noqa: E402


def time_pair(fn_a, fn_b, samples, calls):
    """Median seconds per call of ``fn_a`` and ``fn_b``, and the median of their paired ratios."""
    return compare(fn_a, fn_b, samples=samples, calls=calls, warmup=2)


def bench_nf4(rows, cols, blocksize, samples):
    """Quantize and dequantize throughput (values/s) of lora_lab and bitsandbytes."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    ours = quantize_nf4(w, blocksize)
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(ours.packed, packed.reshape(-1)), "codes differ from bitsandbytes'"
    dequant_theirs = bnb_f.dequantize_4bit(packed, state, quant_type="nf4")
    assert torch.equal(ours.dequantize(), dequant_theirs), "dequantized values differ"

    results = {}
    results["quantize"] = time_pair(
        lambda: quantize_nf4(w, blocksize),
        lambda: bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4"),
        samples,
        calls=1,
    )
    results["dequantize"] = time_pair(
        ours.dequantize,
        lambda: bnb_f.dequantize_4bit(packed, state, quant_type="nf4"),
        samples,
        calls=3,
    )
    return w.numel(), results


def bench_step(d, tokens, rank, samples):
    """Seconds per training step (forward, backward, Adam) of QLoRALinear and LoRALinear."""
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    layers = {"qlora": QLoRALinear(base, rank=rank), "lora": LoRALinear(base, rank=rank)}
    x = torch.randn(tokens, d)
    steps = {}
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)

        def step(layer=layer, opt=opt):
            inp = x.clone().requires_grad_(True)  # as inside a model: the input needs a gradient
            loss = layer(inp).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    held = {
        "qlora": layers["qlora"].weight.nbytes,
        "lora": base.weight.numel() * base.weight.element_size(),
    }
    return time_pair(steps["qlora"], steps["lora"], 2 * samples, calls=1), held


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="weight rows (NF4 bench)")
    parser.add_argument("--cols", type=int, default=4096, help="weight columns (NF4 bench)")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--d", type=int, default=1024, help="layer width (step bench)")
    parser.add_argument("--tokens", type=int, default=512, help="batch x sequence (step bench)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' torch path, uncompiled
        n, results = bench_nf4(args.rows, args.cols, args.blocksize, args.samples)
    print(f"\nNF4, {args.rows} x {args.cols} float32, blocksize {args.blocksize}")
    print(f"{'':12}{'lora_lab':>14}{'bitsandbytes':>16}{'ratio':>8}")
    for name, (t_ours, t_theirs, ratio) in results.items():
        speed = f"{n / t_ours / 1e6:10.0f} M/s {n / t_theirs / 1e6:11.0f} M/s"
        print(f"{name:12}{speed}{1 / ratio:8.2f}   (throughput, lora_lab / bitsandbytes)")

    (t_q, t_l, ratio), held = bench_step(args.d, args.tokens, args.rank, args.samples)
    print(f"\nTraining step, {args.d} x {args.d} layer, {args.tokens} tokens, rank {args.rank}")
    print(f"QLoRALinear {t_q * 1e3:7.1f} ms   base weight held in {held['qlora'] / 2**20:.2f} MiB")
    print(f"LoRALinear  {t_l * 1e3:7.1f} ms   base weight held in {held['lora'] / 2**20:.2f} MiB")
    print(f"QLoRA step / LoRA step: {ratio:.2f}  (dequantizing the weight in forward and backward)")


if __name__ == "__main__":
    main()
