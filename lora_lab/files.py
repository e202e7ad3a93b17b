"""Weight files and model folders: read safetensors with errors that name the file, refuse
non-finite tensors, and write a folder whole or not at all.

``adapters`` (adapter files), ``model`` (the shipped checkpoint, transformers exports) and
``hub`` (random test models) all read and write through these functions; committed results
(``lora_lab/results/*.json``) are read by ``read_json_result``.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch


def read_json_result(path):
    """The parsed JSON of a committed result file, or None if it does not exist.

    A file that exists but is not JSON is a ValueError naming it; what the result must hold is
    for its reader to check (``experiments.read_compare``, ``gpu_results.read_gpu_check``).
    """
    import json

    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def check_finite(tensor, key, where):
    """Refuse a tensor with NaN or infinite values (a diverged run), naming it and its file."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(
            f"{key!r} in {where} has {bad} non-finite values (NaN or infinity) of "
            f"{tensor.numel()}: the training that made it diverged"
        )


def read_safetensors(path):
    """``(tensors, metadata)`` of a safetensors file whose float tensors are all finite.

    A file that is not safetensors (truncated, another format, empty) is a ValueError naming
    it. safetensors holds plain tensors, so reading one never runs code.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "it may be truncated or another format"
        ) from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            check_finite(tensor, key, repr(str(path)))
    return tensors, metadata


def write_folder(path, write):
    """Create the folder ``path`` whole: ``write(tmp)`` fills a folder beside it, then it is
    renamed into place. ``path`` must not exist yet, or be an empty folder. Returns ``path``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"path {path} exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        write(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
