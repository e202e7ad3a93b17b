"""Execute chapters whole, in a fresh kernel, and write them back with their outputs.

    python scripts/execute.py notebooks/05_training_with_lora.ipynb [...]

A notebook is always re-executed from its first cell to its last, never cell by cell by hand,
so its committed outputs are one run's. Afterwards the shared cells are rewritten and solution
outputs stripped (scripts/chapter_cells.py), and the wall and CPU seconds of each run are
printed with the load average: a time measured beside other busy processes is not a
chapter's time (runtime notes are checked against the committed run by tests).
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import chapter_cells  # noqa: E402


def cpu_seconds():
    """CPU seconds used by this process's finished children (the kernels) and itself."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def execute(path, timeout=300):
    """Run ``path`` top to bottom in its folder; write it back; return (wall s, CPU s)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(Path(path).parent)}},
    )
    wall, cpu = time.perf_counter(), cpu_seconds()
    client.execute()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    nbformat.write(notebook, path)
    return wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"notebooks: {str(path)!r} is not a notebook file")
    for path in args.notebooks:
        before = os.getloadavg()[0]
        wall, cpu = execute(path, args.timeout)
        print(
            f"{path.name}: {wall:.1f} s wall, {cpu:.1f} s CPU "
            f"(load average {before:.2f} before, {os.getloadavg()[0]:.2f} after)",
            flush=True,
        )
    chapter_cells.main([str(p) for p in args.notebooks])  # only the notebooks just run


if __name__ == "__main__":
    main()
