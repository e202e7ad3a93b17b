"""lora_lab.quant against bitsandbytes on CPU: codebook, rounding, packing, double quant, QLoRA.

bitsandbytes logs a warning about an optional ``kernels`` package when it is imported on
an AVX512 CPU; its logger is silenced before the import. Its pure-torch CPU path wraps a
function in torch.compile, so the comparisons run it eagerly (``force_eager``): the
results are the same and no compilation slows the tests down.
"""

import logging
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # before the import

import bitsandbytes.functional as bnb_f  # noqa: E402  (required: a broken install fails, not skips)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import lora_lab  # noqa: E402
from lora_lab.quant import (  # noqa: E402
    DQ_BLOCKSIZE,
    NF4_OFFSET,
    QUANT_TYPES,
    QLoRALinear,
    code_usage,
    dynamic_map,
    e2m1_codebook,
    expected_absmax,
    fp4_codebook,
    int4_codebook,
    nf4_assumed_absmax,
    nf4_codebook,
    predicted_code_usage,
    quantize_4bit,
    quantize_e2m1,
    quantize_fp4,
    quantize_int4,
    quantize_nf4,
)


@pytest.fixture(autouse=True)
def eager():
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_roundtrip(w, blocksize, quant_type="nf4", double_quant=False):
    """bitsandbytes' packed codes (flat), its state, and its dequantized tensor.

    Its CPU kernel returns a 1-D tensor as (1, n); that is reshaped back to (n,).
    """
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    out = bnb_f.dequantize_4bit(packed, state, quant_type=quant_type)
    return packed.reshape(-1), state, out.reshape(w.shape)


# ----------------------------------------------------------------------------- codebooks


def test_nf4_codebook_equals_bitsandbytes_table():
    ours, theirs = nf4_codebook(), bnb_f.get_4bit_type("nf4", device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # what the issue asks
    assert torch.equal(ours, theirs)  # and in fact bit for bit


def test_nf4_codebook_is_normal_quantiles():
    cb = nf4_codebook().double()
    assert torch.equal(cb, cb.sort().values)
    assert (cb < 0).sum() == 7 and (cb == 0).sum() == 1 and (cb > 0).sum() == 8
    assert cb[0] == -1 and cb[-1] == 1
    # undo the normalization: each positive level sits at an equally spaced probability
    sd = torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    probs = torch.special.ndtr(cb[8:] * sd)
    expected = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1].flip(0)
    torch.testing.assert_close(probs, expected, atol=1e-7, rtol=0)
    # the paper's offset: halfway between the 1 - 1/(2*15) and 1 - 1/(2*16) quantiles
    assert abs(NF4_OFFSET - (1 - (1 / 30 + 1 / 32) / 2)) < 1e-7


def test_dynamic_map_equals_bitsandbytes():
    ours = dynamic_map()
    assert ours.shape == (256,) and torch.equal(ours, bnb_f.create_dynamic_map())


def test_fp4_codebook_equals_bitsandbytes_table():
    ours, theirs = fp4_codebook(), bnb_f.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))  # code 8 is +0.0 in both


def test_e2m1_codebook_is_the_ocp_grid_and_differs_from_fp4_only_in_its_subnormal():
    ours = e2m1_codebook()
    magnitudes = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert torch.equal(ours[:8], magnitudes) and torch.equal(ours[8:], -magnitudes)
    e2m1, fp4 = ours.sort().values, fp4_codebook().sort().values
    differs = ~torch.isclose(e2m1, fp4, atol=1e-4, rtol=0)
    # bitsandbytes' smallest non-zero FP4 magnitude is 1/192, e2m1's is 1/12
    assert e2m1[differs].abs().tolist() == pytest.approx([1 / 12, 1 / 12])
    assert fp4[differs].abs().tolist() == pytest.approx([1 / 192, 1 / 192])


def test_int4_codebook_is_symmetric_sevenths():
    cb = int4_codebook()
    q = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1])
    assert torch.equal(cb, q.float() / 7)


# ----------------------------------------------------------------------------- NF4 vs bitsandbytes

SHAPES = [(64, 64), (256, 128), (96, 256), (100, 37), (33, 65), (7,), (3, 5), (2, 3, 50), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_nf4_roundtrip_is_bit_exact_against_bitsandbytes(blocksize, dtype):
    gen = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        w = (0.05 * torch.randn(shape, generator=gen)).to(dtype)
        ours = quantize_nf4(w, blocksize)
        packed, state, _ = bnb_roundtrip(w, blocksize)
        assert torch.equal(ours.packed, packed), shape  # same codes, same nibble order
        assert torch.equal(ours.absmax, state.absmax), shape  # same float32 constants
        # bitsandbytes' C kernel is compared on the flattened tensor: see the next test
        _, _, theirs = bnb_roundtrip(w.reshape(-1), blocksize)
        deq = ours.dequantize()
        assert deq.dtype == dtype and deq.shape == w.shape
        assert torch.equal(deq.reshape(-1), theirs.reshape(-1)), shape


@pytest.mark.parametrize(
    "shape, blocksize", [((128, 64), 64), ((64, 256), 128), ((32, 4096), 4096)]
)
def test_nf4_dequantize_equals_bitsandbytes_on_weight_shapes(shape, blocksize):
    """Rows made of whole blocks (every real weight matrix): bitsandbytes' 2-D kernel agrees."""
    w = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    _, _, theirs = bnb_roundtrip(w, blocksize)
    assert torch.equal(quantize_nf4(w, blocksize).dequantize(), theirs)


@pytest.mark.parametrize("shape", [(4, 32), (5, 96), (3, 100)])
def test_bitsandbytes_2d_kernel_when_blocks_straddle_rows(shape):
    """Rows that are not whole blocks: what holds on every CPU, and what depends on the machine.

    Quantizing is the same everywhere, and so is bitsandbytes' kernel on the flat codes. Its
    CPU kernel for a 2-D tensor depends on the build and the CPU: 0.50.2 on an AVX512 CPU
    scales some values (for some row lengths) with another block's absmax, on other machines
    it is exact. Either outcome passes; the test prints which one ran, and checks that a wrong
    value is only ever that: its own code's level, times some block's absmax.
    """
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = quantize_nf4(w, 64)
    packed, state, theirs = bnb_roundtrip(w, 64)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    deq = ours.dequantize()
    assert torch.equal(deq.reshape(-1), bnb_roundtrip(w.reshape(-1), 64)[2])  # flat: exact

    wrong = deq != theirs
    outcome = f"wrong in {int(wrong.sum())} of {w.numel()} values" if wrong.any() else "exact"
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"bitsandbytes' 2-D CPU kernel on {shape} ({cpu}): {outcome}")
    assert not wrong[0].any()  # the first row starts the first block either way
    levels = ours.codebook[ours.codes.long()].view(shape)  # each value's level, from our codes
    some_block = (levels[..., None] * ours.absmax == theirs[..., None]).any(-1)  # (rows, cols)
    assert some_block.all()  # every value is its own level times some block's absmax


def test_dequantize_is_codebook_times_absmax():
    """Small and odd blocksizes too, against the definition written out plainly."""
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    for blocksize in (1, 2, 4, 8, 64):
        q = quantize_nf4(w, blocksize)
        absmax = q.absmax.repeat_interleave(blocksize)[: w.numel()]
        expected = (q.codebook[q.codes.long()] * absmax).view(w.shape)
        assert torch.equal(q.dequantize(), expected)
        blocks = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % blocksize))
        assert torch.equal(q.absmax, blocks.view(-1, blocksize).abs().amax(1))


def _straddling_pairs(count, gen):
    """(absmax, x) pairs whose code differs between x * (1 / absmax) and x / absmax."""
    midpoints = (nf4_codebook()[:-1] + nf4_codebook()[1:]) / 2
    pairs = []
    while len(pairs) < count:
        a = 0.5 + torch.rand(1, generator=gen)
        near = midpoints[torch.randint(0, 15, (1,), generator=gen)] * a
        xs = near + torch.arange(-4, 5) * torch.finfo(torch.float32).eps * near.abs()
        by_mul = torch.bucketize(xs * (1.0 / a), midpoints)
        by_div = torch.bucketize(xs / a, midpoints)
        hit = (by_mul != by_div).nonzero().flatten()
        if len(hit):
            pairs.append((a.item(), xs[hit[0]].item()))
    return pairs


def test_rounding_at_the_last_bit_follows_bitsandbytes():
    """Whole blocks are scaled by the reciprocal of absmax, the last partial block is divided.

    The values are chosen so that the two ways of scaling pick different codes, so an
    implementation that scaled every block the same way would fail here.
    """
    gen = torch.Generator().manual_seed(4)
    full = [v for a, x in _straddling_pairs(8, gen) for v in (a, x) + (0.0,) * 30]
    tail = [v for a, x in _straddling_pairs(1, gen) for v in (a, x)]
    w = torch.tensor(full + tail)  # 8 blocks of 32, then a partial block of 2
    ours = quantize_nf4(w, blocksize=32)
    packed, state, _ = bnb_roundtrip(w, 32)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)


def test_a_tie_goes_to_the_lower_level_as_in_bitsandbytes():
    cb = nf4_codebook()
    midpoints = (cb[:-1] + cb[1:]) / 2
    w = torch.cat([torch.ones(1), midpoints])  # absmax 1: every other value sits on a threshold
    ours = quantize_nf4(w, blocksize=32)
    assert torch.equal(ours.codes[1:], torch.arange(15, dtype=torch.uint8))  # the lower level
    packed, _, _ = bnb_roundtrip(w, 32)
    assert torch.equal(ours.packed, packed)


def test_packing_puts_the_first_code_in_the_high_nibble():
    cb = nf4_codebook()
    w = torch.tensor([1.0, -1.0, 0.0])  # levels 15, 0 and 7; an odd count pads with zero's code
    q = quantize_nf4(w)
    zero_code = int((cb == 0).nonzero())
    assert q.codes.tolist() == [15, 0, zero_code]
    assert q.packed.tolist() == [15 << 4 | 0, zero_code << 4 | zero_code]
    packed, _, _ = bnb_roundtrip(w, 64)
    assert torch.equal(q.packed, packed)


def test_all_zero_blocks_dequantize_to_zero():
    w = torch.zeros(130)
    w[64:128] = torch.linspace(-1, 1, 64)  # block 0 and the partial block 2 stay zero
    q = quantize_nf4(w)
    assert q.absmax[0] == 0 and q.absmax[2] == 0
    assert torch.equal(q.dequantize(), bnb_roundtrip(w, 64)[2])
    assert torch.equal(q.dequantize()[:64], torch.zeros(64))


# ----------------------------------------------------------------------------- double quantization


def test_double_quant_matches_bitsandbytes_except_where_its_search_misses_the_nearest():
    """Counted, not hidden: bitsandbytes' CPU 8-bit quantizer sometimes picks a farther code.

    Its C code looks the value up with a fast binary search (BinSearch's "Direct2") and
    then compares only the slot found with the next one; when the search lands off the
    slot just below the value, the pick is not the nearest level. We always pick the
    nearest. Everything else is equal: the mean, the 256-block scales, the decoded
    constants where the codes agree, and every weight of those blocks.
    """
    w = 0.02 * torch.randn(3000, 1000, generator=torch.Generator().manual_seed(5))
    ours = quantize_nf4(w, 64, double_quant=True)
    packed, state, theirs = bnb_roundtrip(w, 64, double_quant=True)
    assert torch.equal(ours.packed, packed)  # the 4-bit codes do not depend on double quant
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)

    n_blocks = ours.n_blocks
    differs = ours.absmax_codes != state.absmax
    n_differ = int(differs.sum())
    print(f"double quant: {n_differ} of {n_blocks} constants got another 8-bit code")
    assert n_differ <= 0.005 * n_blocks  # 82 of 46875 (0.17%) with this seed

    # ours is the nearest level; bitsandbytes' pick is never nearer
    levels = dynamic_map().double()
    scale = ours.absmax_scale.double().repeat_interleave(DQ_BLOCKSIZE)[:n_blocks]
    x = (quantize_nf4(w, 64).absmax.double() - ours.absmax_offset.double()) / scale
    dist = (x[:, None] - levels[None, :]).abs()  # (n_blocks, 256)
    d_ours = dist.gather(1, ours.absmax_codes.long()[:, None]).squeeze(1)
    d_theirs = dist.gather(1, state.absmax.long()[:, None]).squeeze(1)
    assert torch.all(d_ours <= dist.min(1).values + 1e-7)
    assert torch.all(d_theirs[differs] > d_ours[differs])

    # where the codes agree, the constants and all 64 weights of the block are bit-equal
    their_absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours.absmax[~differs], their_absmax[~differs])
    same_block = (ours.dequantize() == theirs).view(-1, 64).all(1)
    assert torch.equal(same_block, ~differs)


def test_double_quant_constants_are_within_half_a_step_of_the_float_ones():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(6))
    single, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    levels = dynamic_map()
    half_step = (levels[1:] - levels[:-1]).max() / 2  # the coarsest gap of the 8-bit map
    scale = double.absmax_scale.repeat_interleave(DQ_BLOCKSIZE)[: double.n_blocks]
    assert torch.all((double.absmax - single.absmax).abs() <= half_step * scale * (1 + 1e-6))


# ----------------------------------------------------------------------------- storage accounting


def test_nbytes_counts_codes_and_constants_as_bitsandbytes_stores_them():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(7))
    n = w.numel()
    single = quantize_nf4(w, 64)
    assert single.nbytes == n // 2 + 4 * (n // 64)
    assert single.bits_per_weight == 4 + 32 / 64
    double = quantize_nf4(w, 64, double_quant=True)
    n_blocks = n // 64
    assert double.nbytes == n // 2 + n_blocks + 4 * math.ceil(n_blocks / 256) + 4
    assert double.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert round(double.bits_per_weight, 3) == 4.127  # QLoRA's figure
    packed, state, _ = bnb_roundtrip(w, 64, double_quant=True)
    theirs = [packed, state.absmax, state.state2.absmax, state.offset]
    assert double.nbytes == sum(t.numel() * t.element_size() for t in theirs)


def test_nbytes_of_an_odd_size_counts_the_padding_byte():
    q = quantize_nf4(torch.randn(101), 64)
    assert q.packed.numel() == 51 and q.absmax.numel() == 2 and q.nbytes == 51 + 8


def test_repr_and_fields_are_readable():
    q = quantize_nf4(torch.randn(8, 16), 32, double_quant=True)
    assert "nf4" in repr(q) and "bits/weight" in repr(q)
    assert q.codes.shape == (128,) and q.codes.max() < 16
    assert q.shape == (8, 16) and q.dtype == torch.float32 and q.double_quant
    assert set(q.stored_tensors()) == {"packed", "absmax_codes", "absmax_scale", "absmax_offset"}


# ----------------------------------------------------------------------------- baselines


def _rmse(q, w):
    return (q.dequantize() - w).pow(2).mean().sqrt().item()


def test_nf4_beats_every_other_format_on_normal_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(8))
    err = {name: _rmse(quantize_4bit(w, 64, name), w) for name in QUANT_TYPES}
    print("rmse on N(0, 1) weights, blocksize 64:", err)
    assert all(err["nf4"] < err[name] for name in QUANT_TYPES if name != "nf4")
    assert err["e2m1"] < err["fp4"]  # bitsandbytes' 1/192 level is almost a second zero


def test_int4_rounds_to_the_nearest_seventh():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    q = quantize_int4(w)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    expected = torch.round(w.view(-1, 64) / absmax * 7) / 7 * absmax  # no ties in random data
    torch.testing.assert_close(q.dequantize().view(-1, 64), expected, atol=1e-6, rtol=0)
    signed = torch.where(q.codes >= 8, q.codes.int() - 16, q.codes.int())
    assert signed.min() >= -7 and signed.max() <= 7


def test_e2m1_picks_the_nearest_e2m1_value():
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(10))
    q = quantize_e2m1(w)
    scaled = w.view(-1, 64) / q.absmax[:, None]
    levels = e2m1_codebook().unique()
    nearest = levels[(scaled.reshape(-1, 1) - levels).abs().argmin(1)].view(-1, 64)
    torch.testing.assert_close(q.dequantize().view(-1, 64), nearest * q.absmax[:, None])
    assert (q.codes != 8).all()  # code 8 is -0.0: +0.0 (code 0) takes every zero


@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_fp4_equals_bitsandbytes_bit_for_bit(blocksize):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(10))
    w.view(-1)[:5] = torch.tensor([0.0, 1e-6, -1e-6, 0.0026, -0.0026]) * w.abs().max()  # tiny ones
    q = quantize_fp4(w.reshape(-1), blocksize)
    packed, state, theirs = bnb_roundtrip(w.reshape(-1), blocksize, quant_type="fp4")
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    # bitsandbytes' CPU dequantize kernel depends on the instruction set: a tolerance
    torch.testing.assert_close(q.dequantize(), theirs, rtol=1e-6, atol=0)
    used = set(q.codes.tolist())
    assert {0, 8} <= used  # both zeros: tiny negative values take code 0, tiny positive code 8


def test_every_format_keeps_device_shape_and_dtype():
    w = torch.randn(3, 40, dtype=torch.bfloat16)
    for quant_type in QUANT_TYPES:
        q = quantize_4bit(w, 32, quant_type, double_quant=True)
        out = q.dequantize()
        assert out.shape == w.shape and out.dtype == w.dtype and out.device == w.device
        assert q.packed.device == w.device and q.absmax.device == w.device


def test_a_float64_default_dtype_changes_nothing():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(14))
    expected = quantize_nf4(w, 32, double_quant=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        q = quantize_nf4(w, 32, double_quant=True)
        assert torch.equal(q.packed, expected.packed)
        assert torch.equal(q.absmax_codes, expected.absmax_codes)
        assert torch.equal(q.dequantize(), expected.dequantize())
        assert nf4_codebook().dtype == dynamic_map().dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "w, error, words",
    [
        (torch.arange(64), TypeError, ["w", "floating-point", "int64"]),
        (torch.ones(64, dtype=torch.bool), TypeError, ["w", "torch.bool"]),
        ([0.1, 0.2], TypeError, ["w", "torch.Tensor", "list"]),
        (torch.empty(0, 4), ValueError, ["w", "at least one element", "(0, 4)"]),
        (torch.tensor([0.1, float("nan"), 0.3]), ValueError, ["w", "finite", "NaN", "index 1"]),
        (torch.tensor([0.1, 0.2, float("inf")]), ValueError, ["w", "finite", "index 2", "inf"]),
    ],
)
def test_bad_tensors_are_named(w, error, words):
    with pytest.raises(error) as info:
        quantize_nf4(w)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("blocksize", [0, -64, 48, 3, 64.0, True, "64", None])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a positive power of two.*got"):
        quantize_nf4(torch.randn(64), blocksize)


def test_bad_quant_type_and_flag():
    with pytest.raises(ValueError, match=r"quant_type must be one of .*'nf8'"):
        quantize_4bit(torch.randn(64), 64, "nf8")
    with pytest.raises(TypeError, match="double_quant must be True or False, got 1"):
        quantize_nf4(torch.randn(64), 64, double_quant=1)


# ----------------------------------------------------------------------------- code usage


def test_code_usage_counts_codes():
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.0, 0.0]), blocksize=4)
    usage = code_usage(q)
    assert usage.dtype == torch.float64 and usage.shape == (16,)
    assert usage[15] == 0.25 and usage[0] == 0.25 and usage[7] == 0.5 and usage.sum() == 1
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        code_usage(torch.zeros(4))


def test_nf4_assumes_an_absmax_of_its_largest_quantile():
    assumed = nf4_assumed_absmax()
    assert assumed == pytest.approx(1.8481, abs=1e-4)
    # scaled by that absmax, each positive NF4 level is its normal quantile again
    pos_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    quantiles = torch.special.ndtri(pos_p).flip(0)
    torch.testing.assert_close(nf4_codebook()[8:].double() * assumed, quantiles, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 16, 64, 256])
def test_expected_absmax_is_the_mean_largest_abs_of_n_normals(n):
    z = torch.randn(400_000 // n + 1000, n, generator=torch.Generator().manual_seed(n))
    simulated = z.abs().amax(dim=1).mean().item()
    assert expected_absmax(n) == pytest.approx(simulated, rel=0.01)
    if n == 1:
        assert expected_absmax(1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-7)  # E|z|


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [16, 64])
def test_predicted_code_usage_matches_a_simulation(quant_type, blocksize):
    z = torch.randn(4_000_000 // blocksize, blocksize, generator=torch.Generator().manual_seed(2))
    measured = code_usage(quantize_4bit(z.reshape(-1), blocksize, quant_type))
    predicted = predicted_code_usage(blocksize, quant_type)
    assert predicted.sum() == pytest.approx(1, abs=1e-9)
    assert (predicted - measured).abs().max() < 1e-3


def test_predicted_code_usage_at_a_fixed_absmax_clips_at_the_ends():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(3))
    levels = nf4_codebook()
    codes = (torch.clamp(z / 1.85, -1, 1)[:, None] - levels).abs().argmin(1)
    measured = torch.bincount(codes, minlength=16).double() / z.numel()
    assert (predicted_code_usage(64, "nf4", absmax=1.85) - measured).abs().max() < 1e-3


def test_nf4_codes_are_unequal_because_the_absmax_is_larger_than_assumed():
    at_absmax = predicted_code_usage(64, "nf4")
    at_assumed = predicted_code_usage(64, "nf4", absmax=nf4_assumed_absmax())
    assert expected_absmax(64) > 1.35 * nf4_assumed_absmax()
    assert at_absmax.max() / at_absmax.min() > 4  # the middle codes crowd, the outer ones starve
    assert at_assumed.max() / at_assumed.min() < 1.3  # near-equal at the scale NF4 assumes
    assert predicted_code_usage(16, "nf4").min() > at_absmax.min()  # smaller blocks: more even


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"blocksize": 0}, "blocksize must be a positive int"),
        ({"blocksize": 64.0}, "blocksize must be a positive int"),
        ({"quant_type": "nf8"}, "quant_type must be one of"),
        ({"absmax": 0}, "absmax must be None or a positive number"),
        ({"absmax": float("nan")}, "absmax must be None or a positive number"),
        ({"absmax": True}, "absmax must be None or a positive number"),
    ],
)
def test_predicted_code_usage_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        predicted_code_usage(**kw)
    if "blocksize" in kw:
        with pytest.raises(ValueError, match=match):
            expected_absmax(kw["blocksize"])


# ----------------------------------------------------------------------------- QLoRALinear


def _layer(in_features=128, out_features=64, seed=11, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    return base, QLoRALinear(base, **kw)


def test_qlora_holds_only_the_4bit_weight_and_trains_only_lora():
    base, layer = _layer(rank=4, alpha=8)
    params = dict(layer.named_parameters())
    assert set(params) == {"bias", "lora_A.weight", "lora_B.weight"}
    assert [n for n, p in params.items() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert params["lora_A.weight"].shape == (4, 128) and params["lora_B.weight"].shape == (64, 4)
    assert layer.scaling == 2.0 and layer.rank == 4 and layer.alpha == 8
    # no float copy of the weight: the buffers are the packed codes and 8-bit constants
    assert not any(b.shape == base.weight.shape for b in layer.buffers())
    stored = sum(
        b.numel() * b.element_size() for n, b in layer.named_buffers() if n != "weight_codebook"
    )
    assert stored == layer.weight.nbytes
    assert torch.equal(
        layer.weight.dequantize(), quantize_nf4(base.weight, double_quant=True).dequantize()
    )


def test_qlora_init_matches_peft():
    _, layer = _layer(in_features=300, rank=16)
    assert torch.equal(layer.lora_B.weight, torch.zeros(64, 16))
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on a (16, 300) matrix
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_qlora_forward_is_dequantized_base_plus_scaled_update():
    base, layer = _layer(rank=8, alpha=16)
    x = torch.randn(5, 3, 128)
    W = layer.weight.dequantize()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, W, base.bias))  # B = 0 at init
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + base.bias + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_qlora_gradients_reach_lora_and_the_input_only():
    _, layer = _layer()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 128, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert layer.bias.grad is None
    # the input's gradient goes through the 4-bit weight, dequantized again in backward
    x_ref = x.detach().clone().requires_grad_(True)
    W = layer.weight.dequantize()
    y = torch.nn.functional.linear(x_ref, W, layer.bias) + layer.scaling * layer.lora_B(
        layer.lora_A(x_ref)
    )
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    # a bias someone unfreezes gets its gradient too
    layer.bias.requires_grad_(True)
    layer(x_ref.detach()).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((64,), 6.0), atol=0, rtol=0)


def test_qlora_trains_on_a_tiny_regression():
    base, layer = _layer(in_features=64, out_features=32, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(12)
    target_update = 0.1 * torch.randn(32, 2, generator=gen) @ torch.randn(2, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    y = x @ (base.weight.detach() + target_update).T + base.bias.detach()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(150):
        loss = (layer(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    floor = x @ (quantize_nf4(base.weight, double_quant=True).dequantize() - base.weight).T
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; NF4 error alone {floor.pow(2).mean():.4f}")
    assert losses[-1] < 0.25 * losses[0]


def test_merge_gives_a_float_linear_equal_to_forward():
    base, layer = _layer()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert not merged.weight.requires_grad
    x = torch.randn(4, 128)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    expected = layer.weight.dequantize() + layer.delta_weight()
    torch.testing.assert_close(merged.weight, expected, atol=0, rtol=0)


def test_requantizing_a_merged_weight_loses_a_small_update():
    _, layer = _layer()
    with pytest.raises(RuntimeError, match="zero"):
        layer.requantize_error()  # nothing learned yet
    for std, lost in [(1e-4, True), (0.3, False)]:
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, std)
        ratio = layer.requantize_error()
        merged = layer.merged_linear().weight
        requantized = layer.merged_linear(requantize=True).weight
        torch.testing.assert_close(
            requantized, quantize_nf4(merged, double_quant=True).dequantize(), atol=0, rtol=0
        )
        manual = ((requantized - merged).norm() / layer.delta_weight().norm()).item()
        assert ratio == pytest.approx(manual, rel=1e-6)
        assert (ratio >= 1) == lost  # a small update drowns in the re-quantization noise
    with pytest.raises(TypeError, match="requantize must be True or False"):
        layer.merged_linear(requantize="yes")


def test_peft_merge_and_unload_on_a_4bit_layer_is_the_requantized_merge():
    """PEFT dequantizes, adds B A, and quantizes again: lora_lab's merged_linear(requantize=True)."""
    import warnings

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(21)
    base = nn.Linear(128, 64, bias=False)
    model = nn.Sequential()
    model.add_module("proj", bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32,
                                               compress_statistics=True, quant_type="nf4"))  # fmt: skip
    model.proj.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False,
                                          compress_statistics=True, quant_type="nf4")  # fmt: skip
    model = model.to("cpu")  # quantizes the weight
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps bitsandbytes' layer
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = QLoRALinear(base, rank=4, alpha=8, double_quant=True)
    with torch.no_grad():
        peft_layer = peft_model.base_model.model.proj
        peft_layer.lora_B["default"].weight.normal_(0, 0.05)
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
        merged = peft_model.merge_and_unload()
    assert isinstance(merged.proj, bnb.nn.Linear4bit)  # still 4-bit
    w = merged.proj.weight
    theirs = bnb_f.dequantize_4bit(w.data, w.quant_state).float()
    exact, ours = layer.merged_linear().weight, layer.merged_linear(requantize=True).weight
    update = layer.delta_weight().norm()
    # the same re-quantized weight, up to the few 8-bit block constants bitsandbytes codes differently
    assert ((theirs - ours).norm() / update).item() < 0.05
    assert ((theirs - exact).norm() / update).item() == pytest.approx(
        layer.requantize_error(), rel=0.05
    )
    assert layer.requantize_error() > 0.05  # and that is not the exact merge


def test_qlora_with_a_bfloat16_base_keeps_lora_in_float32():
    torch.manual_seed(13)
    base = nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = QLoRALinear(base, rank=4)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    W = layer.weight.dequantize()
    assert W.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x, W, base.bias))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"rank": 0}, ValueError, "rank must be a positive integer, got 0"),
        ({"rank": 2.5}, ValueError, "rank must be a positive integer, got 2.5"),
        ({"rank": True}, ValueError, "rank must be a positive integer, got True"),
        ({"rank": 65}, ValueError, r"rank must be at most .* = 64 .* got 65"),
        ({"alpha": 0}, ValueError, "alpha must be a finite number > 0, got 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number .* got nan"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be a number in \[0, 1\), got -0.1"),
        ({"blocksize": 48}, ValueError, "blocksize must be a positive power of two.*48"),
        ({"double_quant": "yes"}, TypeError, "double_quant must be True or False, got 'yes'"),
        ({"compute_dtype": torch.int8}, ValueError, "compute_dtype must be None .* torch.int8"),
    ],
)
def test_qlora_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        QLoRALinear(nn.Linear(128, 64), **kw)


def test_qlora_bad_base():
    with pytest.raises(
        TypeError, match="base must be a torch.nn.Linear or a transformers Conv1D, got Conv1d"
    ):
        QLoRALinear(nn.Conv1d(4, 4, 1))
    base = nn.Linear(8, 8)
    with torch.no_grad():
        base.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"base.weight must be finite.*index 19"):
        QLoRALinear(base, rank=2)
    with pytest.raises(ValueError, match=r"in_features = 128 .* got shape \(2, 5\)"):
        QLoRALinear(nn.Linear(128, 64))(torch.randn(2, 5))


# ----------------------------------------------------------------------------- apply_qlora


def _tiny_gpt():
    from lora_lab import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, intermediate_size=128))


def test_apply_qlora_quantizes_all_linear_and_trains_only_the_targets():
    from lora_lab import apply_qlora

    model = apply_qlora(_tiny_gpt(), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    qlora = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert len(qlora) == 2 * 7 and isinstance(model.lm_head, nn.Linear)  # the head stays float
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{k}_proj.lora_{ab}.weight"
        for i in (0, 1)
        for k in "qv"
        for ab in "AB"
    }
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        before = model(x)
        merged = lora_lab.merge_lora(model)  # 4-bit layers become float layers holding W + dW
    assert not any(isinstance(m, QLoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_apply_qlora_matches_apply_lora_rules_and_refuses_targets_left_in_float():
    from lora_lab import apply_qlora

    with pytest.raises(ValueError, match="matched no module"):
        apply_qlora(_tiny_gpt(), target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="leaves in float"):
        apply_qlora(_tiny_gpt(), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        apply_qlora(_tiny_gpt(), rank=0)
    rs = apply_qlora(_tiny_gpt(), rank=16, alpha=8, use_rslora=True)
    layer = rs.model.layers[0].self_attn.q_proj
    assert layer.use_rslora and layer.scaling == 8 / 4  # alpha / sqrt(r), as in LoRALinear


def test_qlora_wraps_gpt2_conv1d_as_its_linear(tmp_path):
    from lora_lab import load_model, save_random_model
    from lora_lab.lora import is_conv1d, linear_from_conv1d

    gpt2, _ = load_model(
        str(save_random_model("gpt2", tmp_path / "g", dtype=torch.float32)), device="cpu"
    )
    conv = gpt2.transformer.h[0].attn.c_attn
    assert is_conv1d(conv)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear_from_conv1d(conv)(x), conv(x), rtol=1e-6, atol=1e-6)
        torch.manual_seed(1)
        from_conv = QLoRALinear(conv, rank=4)
        torch.manual_seed(1)
        from_linear = QLoRALinear(linear_from_conv1d(conv), rank=4)
        assert torch.equal(from_conv(x), from_linear(x))
    model = lora_lab.apply_qlora(gpt2, rank=4, target_modules=["c_attn"])
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 2 * 4
