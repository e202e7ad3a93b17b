"""Exercise solutions: hidden until run, and checked by CI."""

import json
from pathlib import Path

import pytest

from lora_lab.checks import Result
from scripts.chapter_cells import SOLUTION

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def solutions(path):
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if SOLUTION in c["metadata"].get("tags", [])]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_solutions_show_no_answer_and_are_checked(path):
    found = solutions(path)
    assert len(found) >= 3, f"{path.name}: {len(found)} solutions, at least 3 exercises expected"
    for cell in found:
        source = "".join(cell["source"])
        assert cell["outputs"] == [], f"{path.name}: a solution's output is committed:\n{source}"
        assert "hide-input" in cell["metadata"]["tags"]  # the book folds it
        assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True  # so does Jupyter
        assert ".require()" in source  # a wrong solution raises when CI runs it
        assert "NBVAL_CHECK_OUTPUT" not in source


def test_require_passes_a_right_result_and_raises_on_a_wrong_one():
    right = Result(True, "= 4.")
    assert right.require() is right
    with pytest.raises(AssertionError, match="the checker rejects this solution: is 4, you have 5"):
        Result(False, "is 4, you have 5").require()
