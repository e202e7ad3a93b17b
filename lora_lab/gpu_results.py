"""The committed result of ``scripts/gpu_check.py``: GPU memory measured for a Llama-2-7B shape.

Chapter 1 and the claims page show it beside chapter 1's estimate and the lesson's figures.
The file exists only once the script has run on a CUDA machine; until then ``read_gpu_check``
returns None and the chapters say that no GPU measurement has been made.
"""

from pathlib import Path

from .files import read_json_result

GPU_CHECK_FILE = Path(__file__).resolve().parent / "results" / "gpu_check.json"
METHODS = ("full", "lora", "qlora")


def read_gpu_check(path=None):
    """The parsed GPU result at ``path`` (default: lora_lab/results/gpu_check.json), or None if absent.

    A file that exists but is not a CUDA result of the three methods is an error naming it.
    """
    path = GPU_CHECK_FILE if path is None else Path(path)
    result = read_json_result(path)
    if result is None:
        return None
    if not isinstance(result, dict) or result.get("cuda") is not True:
        raise ValueError(f'{path}: not a GPU result of scripts/gpu_check.py (needs "cuda": true)')
    rows = result.get("memory")
    if not isinstance(rows, list) or [r.get("method") for r in rows] != list(METHODS):
        raise ValueError(f'{path}: "memory" must list the methods {list(METHODS)} in order')
    for row in rows:
        if "skipped" not in row and not isinstance(row.get("peak_allocated_bytes"), int):
            raise ValueError(f"{path}: {row['method']} has neither a measurement nor a reason")
    return result


def gpu_check_table(result):
    """A pandas DataFrame, one row per method: measured peak GB (or why it was skipped),
    chapter 1's estimate, the lesson's figure, and measured / estimate."""
    import pandas as pd

    rows = []
    for row in result["memory"]:
        measured = None if "skipped" in row else row["peak_allocated_bytes"] / 1e9
        rows.append({
            "method": row["method"],
            "measured peak (GB)": measured,
            "estimate (GB)": row["estimate_bytes"] / 1e9,
            "lesson (GB)": row.get("lesson_gb"),
            "measured / estimate": None if measured is None else measured * 1e9 / row["estimate_bytes"],
            "note": row.get("skipped", ""),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("method")
