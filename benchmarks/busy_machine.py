"""A chapter on a busy machine: torch's spinning OpenMP threads, before and after lora_lab's fix.

    python -m benchmarks.busy_machine                      # chapter 3, quiet and busy
    python -m benchmarks.busy_machine --chapter 05_training_with_lora --busy 2

Runs one chapter four ways and prints wall and CPU seconds of each:

- quiet or busy: busy starts ``--busy`` single-threaded Python loops beside it (the kind of
  background load a laptop has: a browser tab, a build);
- before or after: "after" is the chapter as it is, importing lora_lab first, which sets
  ``OMP_WAIT_POLICY=PASSIVE`` before torch loads OpenMP; "before" adds a first cell that
  imports torch, so OpenMP starts with its default (spinning) waits, as before the fix.

``OMP_WAIT_POLICY`` is removed from the environment of every run, so neither setting leaks in.
"""

import argparse
import multiprocessing
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin():
    while True:
        pass


def run_chapter(name, before):
    """(wall seconds, CPU seconds of the kernel) of one execution of notebooks/<name>.ipynb."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    if before:
        nb.cells.insert(
            0, nbformat.v4.new_code_cell("import torch  # OpenMP starts before lora_lab")
        )
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=1800, resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel is a child, reaped at exit
    return wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", default="03_lora_from_scratch")
    parser.add_argument("--busy", type=int, default=1, help="background busy loops (default 1)")
    args = parser.parse_args(argv)
    if not (ROOT / "notebooks" / f"{args.chapter}.ipynb").is_file():
        raise SystemExit(f"--chapter {args.chapter!r}: no notebooks/{args.chapter}.ipynb")
    if args.busy < 1:
        raise SystemExit(f"--busy must be at least 1, got {args.busy}")
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average at start: {os.getloadavg()}")
    print(f"{'load':<6} {'OpenMP waits':<22} {'wall s':>7} {'CPU s':>7}")
    for load in ("quiet", "busy"):
        loops = []
        if load == "busy":
            loops = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
            for p in loops:
                p.start()
        try:
            for before in (True, False):
                wall, cpu = run_chapter(args.chapter, before)
                label = "before (spinning)" if before else "after (PASSIVE)"
                print(f"{load:<6} {label:<22} {wall:7.1f} {cpu:7.1f}", flush=True)
        finally:
            for p in loops:
                p.terminate()
                p.join()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
