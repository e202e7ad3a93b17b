"""A cell's runtime note ("about 5 s on a 2-core laptop CPU") agrees with the run committed.

The committed notebooks carry nbclient's timestamps for each cell; a note more than a factor
of two (plus a second) away from the committed run's time is out of date.
"""

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NOTE = re.compile(r"about (\d+(?:\.\d+)?) ?s\b")


def seconds(cell):
    ex = cell["metadata"].get("execution", {})
    if "iopub.execute_input" not in ex or "shell.execute_reply" not in ex:
        return None
    start, end = (datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
                  for k in ("iopub.execute_input", "shell.execute_reply"))  # fmt: skip
    return (end - start).total_seconds()


def notes(path):
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        match = NOTE.search("".join(cell["source"])) if cell["cell_type"] == "code" else None
        if match:
            yield i, float(match.group(1)), seconds(cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runtime_notes_match_the_committed_run(path):
    for i, stated, measured in notes(path):
        assert measured is not None, f"{path.name} cell {i}: no timing in its committed run"
        assert stated / 2 - 1 <= measured <= 2 * stated + 1, (
            f"{path.name} cell {i} says about {stated:g} s; its committed run took {measured:.1f} s"
        )


def test_the_check_finds_notes():
    assert sum(1 for path in NOTEBOOKS for _ in notes(path)) >= 10
