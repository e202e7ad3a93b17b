"""Seeding, device choice and an environment report, shared by every chapter."""

import os
import platform
import random
import sys
from importlib import metadata

import numpy as np
import torch

_DEVICES = ("cuda", "mps", "cpu")


def set_seed(seed=0):
    """Seed Python, NumPy and torch (every device) so a chapter reruns identically."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS generators


def get_device(prefer=None):
    """The best device here: CUDA, then Apple's MPS, then the CPU.

    ``prefer`` (or the environment variable ``LORA_LAB_DEVICE``) forces one of
    "cuda", "mps" or "cpu"; asking for one this machine lacks is an error.
    """
    prefer = prefer if prefer is not None else os.environ.get("LORA_LAB_DEVICE")
    if prefer is not None:
        if prefer not in _DEVICES:
            raise ValueError(f"prefer must be one of {_DEVICES} or None, got {prefer!r}")
        if prefer == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("prefer='cuda' but torch sees no CUDA device here")
        if prefer == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("prefer='mps' but torch sees no MPS device here")
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def in_colab():
    """True when running inside Google Colab."""
    return "google.colab" in sys.modules


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions():
    """A dict of the versions that matter for reproducing a chapter."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("lora-lab", "transformers", "peft", "bitsandbytes", "numpy"):
        out[dist] = _version(dist)
    device = get_device()
    out["device"] = str(device)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def print_versions():
    """Print the environment this chapter ran in (its output varies by machine)."""
    for name, value in versions().items():
        print(f"{name:>13}: {value}")
