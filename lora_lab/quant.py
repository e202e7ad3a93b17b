"""4-bit weights for QLoRA: NF4 from normal quantiles, double quantization, baselines, QLoRALinear.

Every format here cuts a tensor into blocks of ``blocksize`` values. A block keeps its
absolute maximum (absmax) as a float32 constant, and each value as a 4-bit code: an
index into a 16-entry codebook of numbers in [-1, 1]. A value decodes as
``codebook[code] * absmax``. Codes are packed two per byte, the first value of a pair in
the high nibble, which is how bitsandbytes lays them out.

Double quantization (QLoRA's second trick) stores the block constants themselves in
8 bits: their mean is subtracted, then they are quantized in blocks of 256 with the
signed 8-bit dynamic type, each of those blocks keeping one float32 absmax.

The baselines are bitsandbytes' FP4 ("fp4", the one the QLoRA paper compares), the OCP
e2m1 4-bit float ("e2m1", the element of the MX FP4 format) and symmetric int4 ("int4").
The NF4 and FP4 paths equal bitsandbytes' ``quantize_4bit`` and ``dequantize_4bit`` bit for
bit; tests/test_quant.py checks it. ``predicted_code_usage`` says how often each code is
used on normally distributed weights, and why NF4's are not used equally often.

Over 400 lines because the formats share one container (``QuantizedTensor``) and one
block layout, and ``QLoRALinear`` computes with them; split, each part would need the others.
"""

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import (
    ALL_LINEAR,
    DEFAULT_TARGETS,
    check_hyperparameters,
    find_target_modules,
    is_conv1d,
    linear_from_conv1d,
    replace_module,
)
from .validate import boolean

NF4_OFFSET = 0.9677083  # outer NF4 quantile 1 - (1/30 + 1/32) / 2, to 7 digits as bitsandbytes
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit default: one absmax per 64 weights
DQ_BLOCKSIZE = 256  # double quantization: block constants are quantized 256 at a time
QUANT_TYPES = ("nf4", "fp4", "e2m1", "int4")  # "fp4" is bitsandbytes' FP4
NF_BITS = (2, 3, 4)  # widths nf_levels builds
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TINY = torch.finfo(torch.float32).tiny  # stands in for absmax = 0 (an all-zero block)
_CHUNK_BYTES = 1 << 14  # dequantize() on a CPU: 16 KiB of codes at a time


# ----------------------------------------------------------------------------- codebooks


def nf4_codebook(device=None):
    """The 16 NF4 levels, sorted: N(0, 1) quantiles (7 negative, an exact 0, 8 positive) in [-1, 1].

    Each side takes equally spaced probabilities from the median (0.5) out to NF4_OFFSET, so
    every level covers about the same probability mass of a normal weight when the block's
    absmax is ``nf4_assumed_absmax()`` (1.85) standard deviations. A block of 64 has its absmax
    near 2.6 (``expected_absmax``), so the middle codes are used more (``predicted_code_usage``).
    Built in float32 steps like bitsandbytes, the table equals the one it ships bit for bit.
    """
    pos_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]  # 8 positive levels
    neg_p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]  # 7 negative levels
    pos = torch.special.ndtri(pos_p.double())  # inverse normal CDF, in standard deviations
    neg = -torch.special.ndtri(neg_p.double())
    zero = torch.zeros(1, dtype=torch.float64)  # the median: an exact zero level
    levels = torch.cat([neg, zero, pos]).float().sort().values  # (16,)
    return (levels / levels.max()).to(device)  # normalized so the largest level is 1


def nf_levels(bits, device=None):
    """The sorted NF levels of a ``bits``-wide code (2, 3 or 4): NF4's construction at any width.

    2**(bits-1) positive quantiles, 2**(bits-1) - 1 negative ones and an exact zero, spaced
    in probability from the median out to NF4_OFFSET as ``nf4_codebook`` does (LoftQ's NF2
    and NF3 keep the same offset). ``nf_levels(4)`` is ``nf4_codebook()``, bit for bit.
    """
    if isinstance(bits, bool) or bits not in NF_BITS:
        raise ValueError(f"bits must be one of {list(NF_BITS)}, got {bits!r}")
    half = 2 ** (bits - 1)
    pos_p = torch.linspace(NF4_OFFSET, 0.5, half + 1, dtype=torch.float32)[:-1]
    neg_p = torch.linspace(NF4_OFFSET, 0.5, half, dtype=torch.float32)[:-1]
    pos, neg = torch.special.ndtri(pos_p.double()), -torch.special.ndtri(neg_p.double())
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return (levels / levels.max()).to(device)


def nf_roundtrip(w, bits=4, blocksize=NF4_BLOCKSIZE):
    """``w`` quantized blockwise to the NF levels of ``bits`` bits and dequantized, in float32.

    The value each weight has after quantization: the nearest level times its block's absmax.
    At 4 bits this is ``quantize_nf4(w, blocksize).dequantize(torch.float32)`` exactly; at 2 and
    3 bits it simulates formats bitsandbytes has no kernel for (LoftQ's low-bit settings).
    """
    _check_tensor(w, "w")
    _check_blocksize(blocksize)
    levels = nf_levels(bits, w.device)
    flat = w.detach().reshape(-1).float()
    scaled, absmax = _scaled_blocks(flat, blocksize)  # (n,), (n_blocks,)
    _check_finite(w, absmax, "w")
    values = levels[_nearest(scaled, levels)]  # (n,) in [-1, 1]
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]  # each value's block absmax
    return (values * scale).view(w.shape)


def e2m1_codebook(device=None):
    """The OCP e2m1 4-bit float (the element of the MX FP4 format), normalized to [-1, 1].

    Indexed by the code's bits ``s e e m``: sign s, a 2-bit exponent e (bias 1) and a 1-bit
    mantissa m, worth ``2**(e-1) * (1 + m/2)``, or ``m/2`` when e = 0 (subnormal). The
    magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6; dividing by 6 puts them in [-1, 1]. This is
    not bitsandbytes' FP4 (``fp4_codebook``), which differs in its smallest level.
    """
    code = torch.arange(16)
    sign = 1.0 - 2.0 * (code >> 3)
    exponent, mantissa = (code >> 1) & 3, code & 1
    normal = 2.0 ** (exponent - 1) * (1 + 0.5 * mantissa)
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, normal)
    return (sign * magnitude / 6).float().to(device)  # code 8 is -0.0


def fp4_codebook(device=None):
    """bitsandbytes' FP4 (``quant_type="fp4"``, the format the QLoRA paper compares), in [-1, 1].

    Indexed by the code's bits ``s e e m`` like e2m1, with the exponent field read the other
    way round (01 is the largest): ``2**(3-e) * (1 + m/2) / 6`` for e = 1..3, which gives
    e2m1's magnitudes 1/6 .. 1. For e = 0 the mantissa bit gives 1/192, not e2m1's 1/12, so
    its smallest step is almost a second zero. Code 8 is +0.0 here, as in bitsandbytes' table,
    so that tiny positive values take it (bitsandbytes' choice, reproduced bit for bit).
    """
    code = torch.arange(16)
    sign = 1.0 - 2.0 * (code >> 3)
    exponent, mantissa = (code >> 1) & 3, code & 1
    normal = 2.0 ** (3 - exponent) * (1 + 0.5 * mantissa) / 6
    magnitude = torch.where(exponent == 0, mantissa / 192.0, normal)
    values = torch.where(magnitude == 0, 0.0, sign * magnitude)  # +0.0 for codes 0 and 8
    return values.float().to(device)


def int4_codebook(device=None):
    """Symmetric int4: code = the integer q in 4-bit two's complement, value = q / 7.

    Only q in -7..7 is ever chosen (q = -8 would lie outside [-1, 1]), so zero is exact
    and the grid is the same on both sides.
    """
    q = torch.arange(16)
    q = torch.where(q >= 8, q - 16, q)  # two's complement: codes 8..15 are -8..-1
    return (q.float() / 7).to(device)


_CODEBOOKS = {
    "nf4": nf4_codebook,
    "fp4": fp4_codebook,
    "e2m1": e2m1_codebook,
    "int4": int4_codebook,
}


def dynamic_map(device=None):
    """The signed 8-bit dynamic type that double quantization codes the constants with.

    256 sorted values in [-1, 1]: 0, 1, and for each decade i = 0..6 the centres of 2**i
    equal bins of [0.1, 1] scaled by 10**(i - 6), with both signs. Small numbers get
    fine steps and large ones coarse steps, like a float with few mantissa bits.
    """
    parts = [torch.zeros(1, dtype=torch.float32), torch.ones(1, dtype=torch.float32)]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)  # (2**i,)
        parts += [centres, -centres]
    return torch.cat(parts).sort().values.to(device)  # (256,)


# ----------------------------------------------------------------------------- checks


def _check_tensor(w, name):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {w.dtype}"
        )
    if w.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {tuple(w.shape)}")


def _check_finite(w, absmax, name):
    """A NaN or inf value makes its block's absmax NaN or inf, so checking absmax is enough."""
    if bool(torch.isfinite(absmax).all()):
        return
    bad = (~torch.isfinite(w)).reshape(-1)
    first = int(bad.nonzero()[0])
    raise ValueError(
        f"{name} must be finite, but {int(bad.sum())} of its {w.numel()} values are NaN or "
        f"inf (the first at flat index {first}, value {w.reshape(-1)[first].item()}); "
        "absmax scaling cannot represent them"
    )


def _check_blocksize(blocksize):
    ok = isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool)
    if not ok or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(
            f"blocksize must be a positive power of two (e.g. 32, 64, 128, 256), got {blocksize!r}"
        )


# ----------------------------------------------------------------------------- the container


class QuantizedTensor:
    """A tensor stored as 4-bit codes in blocks, each block scaled by its absmax.

    ``packed`` holds the codes, ``absmax`` gives the block constants (decoded from their
    8-bit form when double-quantized), ``dequantize()`` rebuilds the float tensor and
    ``nbytes`` counts what is really stored. The codebook is a property of the format,
    shared by every tensor, so it is not counted.
    """

    def __init__(
        self,
        quant_type,
        packed,
        codebook,
        shape,
        dtype,
        blocksize,
        absmax=None,
        absmax_codes=None,
        absmax_scale=None,
        absmax_offset=None,
    ):
        self.quant_type = quant_type  # one of QUANT_TYPES
        self.packed = packed  # (ceil(n / 2),) uint8: two codes a byte, the first in the high nibble
        self.codebook = codebook  # (16,) float32: a code's value in units of its block's absmax
        self.shape = torch.Size(shape)  # the original tensor's shape
        self.dtype = dtype  # the original dtype: dequantize() returns it
        self.blocksize = blocksize  # values per block
        self._absmax = absmax  # (n_blocks,) float32, or None when double-quantized
        self.absmax_codes = absmax_codes  # (n_blocks,) uint8 codes of absmax - offset (dynamic map)
        self.absmax_scale = absmax_scale  # (ceil(n_blocks / 256),) float32 second-level absmax
        self.absmax_offset = absmax_offset  # () float32: the mean, subtracted before coding

    @property
    def double_quant(self):
        return self.absmax_codes is not None

    def numel(self):
        """The number of values (like ``torch.Tensor.numel``)."""
        return math.prod(self.shape)

    @property
    def n_blocks(self):
        return -(-self.numel() // self.blocksize)

    @property
    def codes(self):
        """The 4-bit codes, one per value, unpacked: (n,) uint8 in 0..15."""
        pairs = torch.stack([self.packed >> 4, self.packed & 15], dim=1)  # (n_bytes, 2)
        return pairs.reshape(-1)[: self.numel()]

    @property
    def absmax(self):
        """The float32 block constants dequantize() multiplies by: (n_blocks,)."""
        if not self.double_quant:
            return self._absmax
        scale = self.absmax_scale.repeat_interleave(DQ_BLOCKSIZE)[: self.n_blocks]  # (n_blocks,)
        table = dynamic_map(self.absmax_codes.device)
        return table[self.absmax_codes.long()] * scale + self.absmax_offset

    def stored_tensors(self):
        """``{name: tensor}`` of everything kept per tensor (what ``nbytes`` counts)."""
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        stored = {
            "packed": self.packed,
            "absmax": self._absmax,
            "absmax_codes": self.absmax_codes,
            "absmax_scale": self.absmax_scale,
            "absmax_offset": self.absmax_offset,
        }
        return {name: stored[name] for name in names if stored[name] is not None}

    @property
    def nbytes(self):
        """Bytes stored: packed codes plus the block constants (8-bit + scales + offset with DQ)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def bits_per_weight(self):
        """Stored bits per value: 4 + 32/blocksize, or 4 + 8/blocksize + 32/(256 blocksize) (DQ)."""
        return 8 * self.nbytes / self.numel()

    def dequantize(self, dtype=None):
        """The float tensor back, ``codebook[code] * absmax`` for each value.

        Returned in ``dtype``, by default the dtype the tensor had before quantization.
        """
        dtype = self.dtype if dtype is None else dtype
        n, bs, packed = self.numel(), self.blocksize, self.packed
        byte = torch.arange(256, device=packed.device)
        pairs = self.codebook[torch.stack([byte >> 4, byte & 15], dim=1)]  # (256, 2) float32
        pair_table = pairs.view(torch.int64).view(256)  # each byte's two values as one 8-byte item
        absmax = self.absmax
        values = torch.empty(2 * packed.numel(), dtype=torch.float32, device=packed.device)
        # A CPU works in chunks small enough to stay in cache and on one thread; a GPU at once
        full_bytes = (n - n % bs) // 2  # the bytes that hold whole blocks
        step = max(_CHUNK_BYTES, bs // 2) if packed.device.type == "cpu" else max(full_bytes, 1)
        for start in range(0, full_bytes, step):
            stop = min(start + step, full_bytes)
            chunk = values[2 * start : 2 * stop]  # (2 (stop - start),)
            torch.index_select(pair_table, 0, packed[start:stop].int(), out=chunk.view(torch.int64))
            chunk.view(-1, bs).mul_(absmax[2 * start // bs : 2 * stop // bs, None])
        if 2 * full_bytes < n:  # the last, partial block (and the pad code when n is odd)
            tail = values[2 * full_bytes :]
            torch.index_select(pair_table, 0, packed[full_bytes:].int(), out=tail.view(torch.int64))
            tail.mul_(absmax[-1])
        return values[:n].to(dtype).view(self.shape)

    def __repr__(self):
        return (
            f"QuantizedTensor({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"{self.nbytes} bytes = {self.bits_per_weight:.3f} bits/weight)"
        )


# ----------------------------------------------------------------------------- quantizers


def _nearest(x, levels):
    """Index of the nearest of the sorted ``levels`` for each x; a tie goes to the lower level."""
    midpoints = (levels[:-1] + levels[1:]) / 2  # the decision thresholds
    return torch.bucketize(x, midpoints, out_int32=True)  # midpoints[i-1] < x <= midpoints[i]


def _encoding(codebook):
    """The codebook's sorted usable levels and their codes (not -0.0, nothing outside [-1, 1])."""
    negative_zero = (codebook == 0) & torch.signbit(codebook)
    codes = torch.nonzero((codebook.abs() <= 1) & ~negative_zero).flatten()
    order = torch.argsort(codebook[codes], stable=True)  # two zeros (bnb fp4): code 0 first
    return codebook[codes][order], codes[order].to(torch.uint8)


def _scaled_blocks(flat, blocksize):
    """Each value over its block's absmax, and the absmax: (n,) in [-1, 1] and (n_blocks,)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY))[:, None]).view(-1)
    if full == n:
        return scaled, absmax
    # a last, partial block: bitsandbytes divides here (and multiplies by the reciprocal
    # above); doing the same keeps every code equal to its, down to the rounding
    tail_absmax = flat[full:].abs().amax()
    tail = flat[full:] / tail_absmax.clamp(min=_TINY)
    return torch.cat([scaled, tail]), torch.cat([absmax, tail_absmax[None]])


def _pack(codes, pad_code):
    """(n,) uint8 codes -> (ceil(n / 2),) bytes, the first code of each pair in the high nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, pad_code.reshape(1)])
    return (codes[0::2] << 4) | codes[1::2]


def _double_quantize(absmax):
    """The block constants in 8 bits: (codes (n_blocks,) uint8, scale (ceil(n/256),), offset ())."""
    offset = absmax.mean()  # the constants are all positive: centring them uses both signs
    centred = absmax - offset
    n = centred.numel()
    padded = F.pad(centred, (0, -n % DQ_BLOCKSIZE)).view(-1, DQ_BLOCKSIZE)  # (n_dq_blocks, 256)
    scale = padded.abs().amax(dim=1)  # (n_dq_blocks,)
    normed = centred / scale.clamp(min=_TINY).repeat_interleave(DQ_BLOCKSIZE)[:n]  # in [-1, 1]
    codes = _nearest(normed, dynamic_map(absmax.device)).to(torch.uint8)
    return codes, scale, offset


def quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4", double_quant=False):
    """Quantize ``w`` blockwise to 4 bits in ``quant_type`` ("nf4", "fp4", "e2m1" or "int4").

    Each value becomes the code of the codebook level nearest to ``value / absmax`` of its
    block (a tie goes to the lower level, as in bitsandbytes). Returns a QuantizedTensor.
    """
    return _quantize(w, blocksize, quant_type, double_quant, name="w")


def _quantize(w, blocksize, quant_type, double_quant, name):
    _check_tensor(w, name)
    _check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    boolean("double_quant", double_quant)

    codebook = _CODEBOOKS[quant_type](w.device)
    levels, level_codes = _encoding(codebook)
    flat = w.detach().reshape(-1).float()  # (n,) float32, as bitsandbytes computes
    scaled, absmax = _scaled_blocks(flat, blocksize)  # (n,), (n_blocks,)
    _check_finite(w, absmax, name)
    index = _nearest(scaled, levels)  # (n,) int32 position in the sorted levels
    codes = index.to(torch.uint8) if quant_type == "nf4" else level_codes[index]  # (n,)
    zero = torch.zeros(1, dtype=torch.float32, device=w.device)
    zero_code = level_codes[_nearest(zero, levels)]  # pads an odd count
    packed = _pack(codes, zero_code)

    stored = {"absmax": absmax}
    if double_quant:
        codes8, scale, offset = _double_quantize(absmax)
        stored = {"absmax_codes": codes8, "absmax_scale": scale, "absmax_offset": offset}
    return QuantizedTensor(quant_type, packed, codebook, w.shape, w.dtype, blocksize, **stored)


def quantize_nf4(w, blocksize=NF4_BLOCKSIZE, double_quant=False):
    """NF4: 4-bit codes whose levels are normal quantiles, one float32 absmax per block."""
    return quantize_4bit(w, blocksize, "nf4", double_quant)


def quantize_fp4(w, blocksize=NF4_BLOCKSIZE, double_quant=False):
    """bitsandbytes' FP4 baseline (``quant_type="fp4"``): 4-bit floats scaled by the block's absmax."""
    return quantize_4bit(w, blocksize, "fp4", double_quant)


def quantize_e2m1(w, blocksize=NF4_BLOCKSIZE, double_quant=False):
    """OCP e2m1 baseline: each code is an e2m1 4-bit float, scaled by its block's absmax."""
    return quantize_4bit(w, blocksize, "e2m1", double_quant)


def quantize_int4(w, blocksize=NF4_BLOCKSIZE, double_quant=False):
    """Symmetric int4 baseline: 15 evenly spaced levels -7/7 .. 7/7 of the block's absmax."""
    return quantize_4bit(w, blocksize, "int4", double_quant)


# ----------------------------------------------------------------------------- code usage

_GRID = torch.linspace(0, 12, 48_001, dtype=torch.float64)  # absmax values, in std devs


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def code_usage(q):
    """The share of ``q``'s values stored with each of the 16 codes: (16,) float64, indexed by code."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor (from quantize_4bit), got {type(q).__name__}")
    counts = torch.bincount(q.codes.long().cpu(), minlength=16).double()
    return counts / counts.sum()


def nf4_assumed_absmax():
    """The block absmax, in standard deviations, at which NF4's levels are equal-probability quantiles.

    NF4 divides its normal quantiles by the largest, Phi^-1(NF4_OFFSET): a level times the
    block's absmax is the quantile it was built as only when absmax = Phi^-1(NF4_OFFSET) sigma.
    """
    return torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)).item()


def expected_absmax(blocksize=NF4_BLOCKSIZE):
    """E[max |z|] over a block of ``blocksize`` independent N(0, 1) values, in standard deviations.

    The maximum is below x when every |z| is, with probability erf(x / sqrt(2)) ** blocksize,
    so E[max] is the integral over x > 0 of 1 - erf(x / sqrt(2)) ** blocksize (computed here).
    """
    n = _positive_int("blocksize", blocksize)
    return torch.trapezoid(1 - torch.erf(_GRID / math.sqrt(2)) ** n, _GRID).item()  # tail < 1e-30


def predicted_code_usage(blocksize=NF4_BLOCKSIZE, quant_type="nf4", absmax=None):
    """How often each code is used on N(0, 1) weights quantized in blocks: (16,) float64 by code.

    With ``absmax=None``, each block is scaled by its own absmax M, the largest of ``blocksize``
    values |z| (density n 2 phi(m) (2 Phi(m) - 1)^(n - 1)). The largest value lands on level +1
    or -1; the other n - 1 are normal values with |z| < M, and a code's share is the chance that
    z / M falls between its decision thresholds, averaged over M. With ``absmax=a`` (in standard
    deviations) every block is scaled by a instead, and values beyond a clip to the end levels.
    """
    n = _positive_int("blocksize", blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    levels, level_codes = _encoding(_CODEBOOKS[quant_type]())
    levels = levels.double()
    thresholds = (levels[:-1] + levels[1:]) / 2  # decisions between neighbours, in units of absmax
    one = torch.ones(1, dtype=torch.float64)
    if absmax is None:
        m = _GRID[1:]  # M > 0
        inside = torch.erf(m / math.sqrt(2))  # P(|z| < m), (G,)
        density = n * 2 * torch.exp(-(m**2) / 2) / math.sqrt(2 * math.pi) * inside ** (n - 1)
        cdf = _normal_cdf(m[:, None] * torch.cat([-one, thresholds, one]))  # (G, levels + 1)
        given_m = (cdf[:, 1:] - cdf[:, :-1]) / inside[:, None]  # a non-maximal value, (G, levels)
        share = (n - 1) / n * torch.trapezoid(density[:, None] * given_m, m, dim=0)
        for end in (-one, one):  # the block's largest value is its absmax: +1 or -1, even odds
            share[_nearest(end, levels)] += 0.5 / n
    else:
        ok = isinstance(absmax, numbers.Real) and not isinstance(absmax, bool)
        if not ok or not math.isfinite(absmax) or absmax <= 0:
            raise ValueError(
                f"absmax must be None or a positive number of standard deviations, got {absmax!r}"
            )
        inf = torch.full((1,), math.inf, dtype=torch.float64)
        cdf = _normal_cdf(absmax * torch.cat([-inf, thresholds, inf]))
        share = cdf[1:] - cdf[:-1]
    usage = torch.zeros(16, dtype=torch.float64)
    return usage.index_add_(0, level_codes.long(), share)


# ----------------------------------------------------------------------------- QLoRA layer


class _Linear4bit(torch.autograd.Function):
    """``x @ W.T + b`` with W kept in 4 bits: dequantized in forward, and again in backward.

    Only the 4-bit weight is saved for backward, never the float matrix, which is where
    QLoRA saves memory and why a step costs more time than plain LoRA's.
    """

    @staticmethod
    def forward(ctx, x, qweight, bias, dtype):
        ctx.qweight, ctx.dtype = qweight, dtype
        return F.linear(x, qweight.dequantize(dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ ctx.qweight.dequantize(ctx.dtype)  # (..., in)
        if ctx.needs_input_grad[2]:  # only if someone unfroze the bias
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias, None


def _check_qlora_args(base, rank, alpha, dropout, compute_dtype, use_rslora):
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"base must be a torch.nn.Linear or a transformers Conv1D, got {type(base).__name__}"
        )
    check_hyperparameters(rank, alpha, dropout, use_rslora)  # LoRA's own checks
    limit = min(base.in_features, base.out_features)
    if rank > limit:
        raise ValueError(
            f"rank must be at most min(in_features, out_features) = {limit} for this layer, "
            f"got {rank!r}"
        )
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise ValueError(
            "compute_dtype must be None (the base weight's dtype) or one of "
            f"{[str(d) for d in _FLOAT_DTYPES]}, got {compute_dtype!r}"
        )


class QLoRALinear(nn.Module):
    """QLoRA: a frozen NF4 copy of an ``nn.Linear``'s weight plus a trainable LoRA update.

    ``y = dequant(W) x + b + scaling * B (A x)``. The float weight is not kept: the layer
    holds only the 4-bit codes and block constants (buffers) and the frozen bias. ``lora_A``
    (rank, in) and ``lora_B`` (out, rank) follow PEFT's names and init, in float32 (or
    float64 for a float64 base) whatever the base dtype. Move it with ``.to(device)``;
    casting it with ``.half()`` would round the block constants.
    """

    def __init__(
        self,
        base,
        rank=8,
        alpha=16,
        dropout=0.0,
        blocksize=NF4_BLOCKSIZE,
        double_quant=True,
        compute_dtype=None,
        use_rslora=False,
    ):
        super().__init__()
        if is_conv1d(base):  # GPT-2's layers: the same map as an nn.Linear, weight transposed
            base = linear_from_conv1d(base)
        _check_qlora_args(base, rank, alpha, dropout, compute_dtype, use_rslora)
        weight = base.weight.detach()  # only its 4-bit copy is kept

        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = int(rank), alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank  # as LoRALinear
        self.blocksize, self.double_quant = blocksize, double_quant
        self.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        self._weight_dtype = weight.dtype

        qweight = _quantize(weight, blocksize, "nf4", double_quant, name="base.weight")
        stored = qweight.stored_tensors()
        for name in ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset"):
            self.register_buffer(f"weight_{name}", stored.get(name))  # None if not stored
        self.register_buffer("weight_codebook", qweight.codebook, persistent=False)
        bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), False)
        self.register_parameter("bias", bias)  # frozen, kept in its own precision

        lora_dtype = torch.promote_types(weight.dtype, torch.float32)  # "higher precision"
        kw = {"bias": False, "device": weight.device, "dtype": lora_dtype}
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.rank, **kw)  # A: (rank, in)
        self.lora_B = nn.Linear(self.rank, self.out_features, **kw)  # B: (out, rank)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A ~ Kaiming-uniform(a=sqrt(5)) as in PEFT, B = 0: the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self):
        """The frozen base weight as a QuantizedTensor (NF4), rebuilt around the buffers."""
        return QuantizedTensor(
            "nf4",
            self.weight_packed,
            self.weight_codebook,
            (self.out_features, self.in_features),
            self._weight_dtype,
            self.blocksize,
            absmax=self.weight_absmax,
            absmax_codes=self.weight_absmax_codes,
            absmax_scale=self.weight_absmax_scale,
            absmax_offset=self.weight_absmax_offset,
        )

    def forward(self, x):  # x: (..., in)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features = {self.in_features} values in its last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _Linear4bit.apply(x.to(self.compute_dtype), self.weight, bias, self.compute_dtype)
        x_lora = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.scaling * self.lora_B(self.lora_A(x_lora))  # (..., out)
        return (y + update.to(y.dtype)).to(x.dtype)

    def delta_weight(self):
        """The update ``scaling * B @ A`` as an (out, in) matrix, in the LoRA dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merged_linear(self, requantize=False):
        """A new, frozen float ``nn.Linear`` holding dequant(W) + scaling * B @ A (compute_dtype).

        Unlike ``LoRALinear.merge()``, which adds the update to its float weight in place, the
        4-bit base cannot take the update: it is dequantized into a new layer. With
        ``requantize=True`` the merged weight is rounded back to NF4 first (this layer's block
        size and double quantization) and returned dequantized: what PEFT's ``merge_and_unload()``
        stores for a bitsandbytes 4-bit layer, and what the update loses there (requantize_error).
        ``merge_lora`` uses the exact merge.
        """
        boolean("requantize", requantize)
        merged = self.weight.dequantize(torch.float32) + self.delta_weight().float()
        if requantize:
            merged = quantize_nf4(merged, self.blocksize, self.double_quant).dequantize()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=merged.device,
            dtype=self.compute_dtype,
        )
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    @torch.no_grad()
    def requantize_error(self):
        """||NF4(W') - W'|| / ||dW|| for the merged weight W' = dequant(W) + dW.

        How large the noise of re-quantizing the merged weight (``merged_linear(requantize=True)``,
        PEFT's merge into a 4-bit layer) is next to the update it should carry: near or above 1,
        the fine-tuning is mostly lost in that noise.
        """
        delta = self.delta_weight().float()
        update_norm = delta.norm()
        if update_norm == 0:
            raise RuntimeError(
                "requantize_error: the update scaling * B @ A is zero (lora_B starts at 0); "
                "train the layer first"
            )
        merged = self.weight.dequantize(torch.float32) + delta
        requantized = quantize_nf4(merged, self.blocksize, self.double_quant).dequantize()
        return float((requantized - merged).norm() / update_norm)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"bits_per_weight={self.weight.bits_per_weight:.3f}"
        )


def apply_qlora(
    model,
    rank=8,
    alpha=16,
    target_modules=DEFAULT_TARGETS,
    dropout=0.0,
    use_rslora=False,
    *,
    quantize=ALL_LINEAR,
    blocksize=NF4_BLOCKSIZE,
    double_quant=True,
    compute_dtype=None,
):
    """QLoRA on ``model``, in place, as apply_lora is LoRA; returns ``model``.

    Every layer ``quantize`` selects (default: every linear layer but the output head, as in
    the QLoRA paper) becomes a QLoRALinear with a frozen NF4 base; the adapters of the layers
    ``target_modules`` selects train, the others stay frozen at B = 0. Both are matched as
    ``apply_lora`` matches (PEFT's rule). Every other parameter is frozen.
    """
    check_hyperparameters(rank, alpha, dropout, use_rslora)
    quantized = find_target_modules(model, quantize)
    targets = find_target_modules(model, target_modules)
    outside = [name for name in targets if name not in set(quantized)]
    if outside:
        raise ValueError(
            f"target_modules {target_modules!r} selects {outside[:3]}, which quantize="
            f"{quantize!r} leaves in float: put adapters only on quantized layers (or use apply_lora)"
        )
    layers = {}
    for name in quantized:  # build every layer before changing the model
        try:
            layers[name] = QLoRALinear(model.get_submodule(name), rank, alpha, dropout,
                                       blocksize, double_quant, compute_dtype, use_rslora)  # fmt: skip
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (layer {name!r})") from None
    for name, layer in layers.items():
        replace_module(model, name, layer)
    model.requires_grad_(False)
    for name in targets:
        layers[name].lora_A.weight.requires_grad_(True)
        layers[name].lora_B.weight.requires_grad_(True)
    return model
