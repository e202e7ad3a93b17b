"""Settings for every pytest run here: unit tests, nbval and the book test."""

import os

# transformers and the hub must never try the network; nbval's kernels inherit this
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")
