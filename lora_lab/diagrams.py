"""Diagrams drawn by code: the LoRA block, NF4's levels from normal quantiles, NF4's storage.

Each function draws on a new matplotlib figure (or the ``ax`` given) and returns the figure,
so a chapter shows it with one call and a test can read back what it drew. Every number in
a picture is computed from lora_lab (the codebook, the block sizes, ``nf4_bytes``), never
typed in.
"""

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .quant import DQ_BLOCKSIZE, NF4_BLOCKSIZE, NF4_OFFSET, nf4_codebook

FROZEN, TRAINED, DATA = "#c9ced6", "#f6b26b", "#ffffff"  # colours: frozen, trainable, tensors


def _axes(ax, size):
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
    return ax.figure, ax


def _box(ax, x, y, w, h, text, color, fontsize=11):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                facecolor=color, edgecolor="#333333", linewidth=1.2))  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.2,
                                 color="#333333", shrinkA=0, shrinkB=0))  # fmt: skip


def lora_block(d_in=4096, d_out=4096, rank=8, alpha=16, ax=None):
    """The LoRA layer: h = W x + (alpha / r) B A x, the frozen path beside the trainable one.

    Box widths follow the matrices' shapes (A is r x d_in, B is d_out x r), so the picture
    also shows how thin the adapter is; the parameter counts are computed, not typed.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if rank > min(d_in, d_out):
        raise ValueError(f"rank must be at most min(d_in, d_out) = {min(d_in, d_out)}, got {rank}")
    fig, ax = _axes(ax, (8, 4.6))
    thin = max(0.12, 1.6 * rank / max(d_in, d_out))  # A's and B's drawn thickness
    _box(ax, 0.5, 0.35, 0.8, 0.3, "x", DATA)
    _box(ax, 0.5, 4.65, 0.8, 0.3, "h", DATA)
    _box(ax, 0.5, 4.0, 0.45, 0.45, "+", DATA, fontsize=14)
    _box(ax, -1.0, 2.2, 1.6, 1.6,
         f"W\n{d_out} x {d_in}\nfrozen\n{d_in * d_out:,} numbers", FROZEN, fontsize=10)  # fmt: skip
    _box(ax, 2.2, 1.35, 1.6, thin, "", TRAINED)
    ax.text(3.15, 1.35, f"A: {rank} x {d_in}, random init", va="center", fontsize=10)
    _box(ax, 2.2, 2.9, thin, 1.2, "", TRAINED)
    ax.text(2.45, 2.9, f"B: {d_out} x {rank}\nstarts at 0", va="center", fontsize=10)
    ax.text(2.45, 3.7, f"x alpha/r = {alpha / rank:g}", ha="left", fontsize=10)
    _arrow(ax, (0.5, 0.5), (-1.0, 1.4))
    _arrow(ax, (0.5, 0.5), (2.2, 1.35 - thin / 2))
    _arrow(ax, (-1.0, 3.0), (0.3, 3.85))
    _arrow(ax, (2.2, 1.35 + thin / 2), (2.2, 2.3))
    _arrow(ax, (2.2, 3.55), (0.7, 3.9))
    _arrow(ax, (0.5, 4.22), (0.5, 4.5))
    adapter = rank * (d_in + d_out)
    ax.set_title(f"LoRA: h = W x + (alpha/r) B A x; trainable {adapter:,} numbers, "
                 f"{adapter / (d_in * d_out):.2%} of W", fontsize=11)  # fmt: skip
    ax.set_xlim(-2.2, 5.6)
    ax.set_ylim(0, 5.0)
    ax.set_axis_off()
    return fig


def nf4_quantiles():
    """How NF4's 16 levels are made: equal steps of probability, read off the normal CDF.

    Left: the N(0, 1) CDF; the 8 positive levels are the quantiles at probabilities from 0.5
    to NF4_OFFSET in equal steps, the 7 negative ones likewise, plus an exact 0. Right: the
    levels, divided by the largest, under the density: dense near 0, sparse in the tails.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    dd = torch.float64
    pos_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=dd)[:-1]
    neg_p = 1 - torch.linspace(NF4_OFFSET, 0.5, 8, dtype=dd)[:-1]
    probs = torch.cat([neg_p, torch.tensor([0.5], dtype=dd), pos_p])
    quantiles = torch.special.ndtri(probs)
    z = torch.linspace(-2.6, 2.6, 400, dtype=dd)
    left.plot(z, torch.special.ndtr(z), color="#555555", label="N(0, 1) CDF")
    for i, (p, q) in enumerate(zip(probs.tolist(), quantiles.tolist(), strict=True)):
        left.hlines(p, -2.6, q, color="tab:blue", linewidth=0.8, alpha=0.6,
                    label="equal steps of probability" if i == 0 else None)  # fmt: skip
        left.vlines(q, 0, p, color="tab:orange", linewidth=1.2,
                    label="their quantiles: the levels" if i == 0 else None)  # fmt: skip
    left.set(xlabel="standard deviations", ylabel="probability", xlim=(-2.6, 2.6), ylim=(0, 1))
    left.set_title(f"16 levels from probabilities {1 - NF4_OFFSET:.4f} ... {NF4_OFFSET:.4f}")
    left.legend(loc="upper left", fontsize=8)
    levels = nf4_codebook().double()
    scale = float(quantiles.max())
    torch.testing.assert_close(quantiles.sort().values / scale, levels, rtol=0, atol=1e-6)
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    right.plot(z / scale, pdf, color="#555555", label="N(0, 1) density (x / outer level)")
    for i, level in enumerate(levels.tolist()):
        height = math.exp(-0.5 * (level * scale) ** 2) / math.sqrt(2 * math.pi)
        right.vlines(level, 0, height, color="tab:orange", linewidth=1.5,
                     label="the 16 NF4 levels" if i == 0 else None)  # fmt: skip
    right.set(xlabel="normalized weight (a block's weights / their absmax)", ylabel="density",
              xlim=(-1.15, 1.15))  # fmt: skip
    right.set_title("divided by the largest: the NF4 codebook")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def nf4_storage(numel=4096 * 4096, blocksize=NF4_BLOCKSIZE, shown=6, ax=None):
    """NF4 storage with double quantization, for a weight matrix of ``numel`` weights.

    Each block of ``blocksize`` weights keeps blocksize/2 bytes of 4-bit codes and its absmax
    as an 8-bit code; every DQ_BLOCKSIZE absmaxes share one float32 scale. The totals come
    from ``nf4_bytes`` and are checked against the parts drawn.
    """
    from .estimate import nf4_bytes

    if isinstance(numel, bool) or not isinstance(numel, int) or numel < blocksize * shown:
        raise ValueError(f"numel must be an int of at least {blocksize * shown}, got {numel!r}")
    fig, ax = _axes(ax, (10, 4.4))
    blocks = -(-numel // blocksize)
    scales = -(-blocks // DQ_BLOCKSIZE)
    parts = {"codes": numel // 2, "absmax codes": blocks, "scales": 4 * scales,
             "offset + 256-entry absmax code": 4 + 256 * 4, "16-entry NF4 codebook": 16 * 4}  # fmt: skip
    total = nf4_bytes(numel, blocksize, double_quant=True)
    if sum(parts.values()) != total:
        raise AssertionError(f"the diagram's parts {parts} do not add up to nf4_bytes = {total}")
    width = 1.4
    for i in range(shown):
        x = 0.9 + i * (width + 0.15)
        _box(ax, x, 3.3, width, 0.5, f"block {i}\n{blocksize} weights", DATA, fontsize=8)
        _box(ax, x, 2.4, width, 0.45, f"{blocksize // 2} bytes\nof codes", TRAINED, fontsize=8)
        _box(ax, x, 1.6, width * 0.85, 0.4, "absmax\n8-bit", FROZEN, fontsize=7)
        _arrow(ax, (x, 3.05), (x, 2.62))
        _arrow(ax, (x, 2.18), (x, 1.8))
    ax.text(0.9 + shown * (width + 0.15) - 0.4, 3.3, f"... {blocks:,} blocks", va="center")
    end = 0.9 + (shown - 1) * (width + 0.15)
    ax.plot([0.9 - width * 0.3, end + width * 0.3], [1.25, 1.25], color="#333333")
    _box(ax, (0.9 + end) / 2, 0.65, 6.0, 0.45,
         f"1 float32 scale per {DQ_BLOCKSIZE} absmaxes ({scales:,} in all)", FROZEN, fontsize=9)  # fmt: skip
    _arrow(ax, ((0.9 + end) / 2, 1.25), ((0.9 + end) / 2, 0.9))
    ax.text(9.8, 2.4, "\n".join(f"{k}: {v:,} B" for k, v in parts.items()), va="center",
            fontsize=9, family="monospace")  # fmt: skip
    ax.set_title(f"NF4 with double quantization: {8 * total / numel:.3f} bits per weight "
                 f"({total:,} bytes for {numel:,} weights; bf16: {2 * numel:,})", fontsize=11)  # fmt: skip
    ax.set_xlim(-0.2, 15.5)
    ax.set_ylim(0.2, 3.8)
    ax.set_axis_off()
    return fig
