"""Low-rank approximation by SVD, and a real photograph to compress (chapter 2)."""

import matplotlib.cbook
import matplotlib.image
import torch

from .validate import describe, int_between, matrix


def low_rank_approx(M, r):
    """The best rank-``r`` approximation of a 2-D tensor ``M`` (Eckart-Young), by truncated SVD."""
    matrix("M", M)
    int_between("r", r, 0, min(M.shape), what="min(M.shape)")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n)
    return (U[:, :r] * S[:r]) @ Vh[:r]  # (m, n), rank <= r


def energy_captured(S, r):
    """Share of ``sum(S**2)`` held by the ``r`` largest singular values in ``S``."""
    if not isinstance(S, torch.Tensor) or S.ndim != 1:
        raise ValueError(f"S must be a 1-D tensor of singular values, got {describe(S)}")
    int_between("r", r, 0, S.numel(), what="len(S)")
    power = torch.sort(S.double() ** 2, descending=True).values
    return (power[:r].sum() / power.sum()).item()


def sample_image():
    """Grace Hopper's portrait, shipped with matplotlib, as a grayscale (H, W) float32 tensor in [0, 1]."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    rgb = torch.from_numpy(matplotlib.image.imread(path).copy()).float() / 255.0  # (H, W, 3)
    luma = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 weights
    return rgb @ luma  # (H, W)
