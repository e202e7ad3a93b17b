"""The diagrams draw computed numbers, and refuse bad sizes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lora_lab import diagrams  # noqa: E402
from lora_lab.estimate import nf4_bytes  # noqa: E402


def texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title])


def test_lora_block_counts_the_adapter():
    fig = diagrams.lora_block(d_in=1024, d_out=4096, rank=16, alpha=32)
    words = texts(fig)
    assert "trainable 81,920 numbers, 1.95% of W" in words  # 16 * (1024 + 4096)
    assert "A: 16 x 1024" in words and "B: 4096 x 16" in words and "alpha/r = 2" in words
    plt.close(fig)
    with pytest.raises(ValueError, match="rank must be at most min"):
        diagrams.lora_block(d_in=8, d_out=8, rank=9)
    with pytest.raises(ValueError, match="d_in must be a positive int"):
        diagrams.lora_block(d_in=0)


@pytest.mark.parametrize("numel", [4096 * 4096, 11008 * 4096, 64 * 6])
def test_nf4_storage_parts_add_up_to_nf4_bytes(numel):
    fig = diagrams.nf4_storage(numel)
    words = texts(fig)
    assert f"{nf4_bytes(numel):,} bytes for {numel:,} weights" in words
    assert f"{8 * nf4_bytes(numel) / numel:.3f} bits per weight" in words
    plt.close(fig)


def test_nf4_storage_refuses_too_few_weights():
    with pytest.raises(ValueError, match="numel must be an int of at least 384"):
        diagrams.nf4_storage(100)


def test_nf4_quantiles_draws_the_codebook():
    fig = diagrams.nf4_quantiles()  # asserts inside that the quantiles give the codebook
    assert len(fig.axes) == 2 and "0.0323 ... 0.9677" in texts(fig)
    plt.close(fig)
