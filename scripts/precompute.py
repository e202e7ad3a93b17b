"""What every precompute script shares: the clock and load it records, and an atomic write.

``scripts/ch08_compare.py`` and ``scripts/ch11_variants.py`` start a ``Clock`` before their
runs, put ``clock.meta(...)`` in the results (machine, versions, wall and CPU seconds, the
load average at both ends), and write the file with ``write_json``; ``ch09_grid.py`` writes
with ``write_json`` too.
"""

import json
import os
import platform
import tempfile
import time
from pathlib import Path


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except OSError:  # not available on this OS
        return None


def write_json(path, data):
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Clock:
    """Wall and CPU time and the load average from its creation to ``meta()``."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), time.process_time(), load_average()

    def meta(self, script, quick):
        """The ``meta`` entry of a results file made on the shipped model, on the CPU."""
        import torch

        return {
            "script": script + (" --quick" if quick else ""),
            "quick": quick,
            "model": "lora-lab/tiny-gpt (shipped)",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "wall_s": round(time.perf_counter() - self.wall, 1),
            "cpu_s": round(time.process_time() - self.cpu, 1),
            "load_average_1_5_15min": {"start": self.load, "end": load_average()},
        }
