"""Every chapter has a main path a learner can follow: objectives with a measured time on top,
expert detours folded, and no long cell without a reason."""

import io
import json
import tokenize
from pathlib import Path

import pytest

from scripts import chapter_cells
from scripts.chapter_cells import DEEP_DIVE, OBJECTIVES, TIME_LINE, time_line

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
LONG = 30  # statements (logical lines); a longer code cell on the main path must say why


def statements(text):
    """Logical lines of a code cell: a call the formatter spreads over five lines counts once,
    so the layout ruff format chooses does not decide what is long."""
    tokens = tokenize.generate_tokens(io.StringIO(text + "\n").readline)
    return sum(1 for token in tokens if token.type == tokenize.NEWLINE)


def cells_of(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_objectives_come_first_and_state_the_measured_time(path):
    cells = cells_of(path)
    tagged = [i for i, c in enumerate(cells) if OBJECTIVES in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} objectives cells, one expected"
    i = tagged[0]
    env = next(
        j for j, c in enumerate(cells) if "lora-lab:environment" in c["metadata"].get("tags", [])
    )
    assert i == env + 1, f"{path.name}: objectives at cell {i}, expected right after cell {env}"
    text = source(cells[i])
    assert text.startswith("## In this chapter") and "\n- " in text
    assert text.rstrip().endswith(time_line(cells)), f"{path.name}: run scripts/chapter_cells.py"
    assert "to run on a 2-core laptop CPU" in text  # the notebook was executed whole


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_deep_dives_are_folded_and_long_cells_say_why(path):
    in_dive = False
    for i, cell in enumerate(cells_of(path)):
        tags, text = cell["metadata"].get("tags", []), source(cell)
        if cell["cell_type"] == "markdown" and text.startswith("## "):
            in_dive = text.startswith("## Deep dive: ")
        assert (DEEP_DIVE in tags) == in_dive, f"{path.name} cell {i}: deep-dive tag is wrong"
        if cell["cell_type"] != "code":
            continue
        if in_dive:
            assert "hide-cell" in tags and cell["metadata"]["jupyter"]["source_hidden"] is True
        if in_dive or "solution" in tags or text.startswith("# long cell: "):
            continue  # a folded dive, a folded solution, or a cell that says why it is long
        n = statements(text)
        assert n <= LONG, (
            f"{path.name} cell {i} has {n} statements: move it into lora_lab or a deep dive, "
            "or start it with '# long cell: <why>'"
        )


def test_the_time_line_counts_words_and_the_committed_run():
    def code(text, seconds, tags=()):
        start = "2026-01-01T00:00:00.000000Z"
        end = f"2026-01-01T00:00:{seconds:02d}.000000Z"
        ex = {"iopub.execute_input": start, "shell.execute_reply": end}
        return {"cell_type": "code", "source": text, "metadata": {"tags": list(tags),
                "execution": ex}}  # fmt: skip

    prose = {"cell_type": "markdown", "source": "word " * 1300, "metadata": {"tags": []}}
    dive = {"cell_type": "markdown", "source": "deep " * 300, "metadata": {"tags": [DEEP_DIVE]}}
    cells = [prose, dive, code("x = 1", 12), code("y = 2", 9, [DEEP_DIVE])]
    line = time_line(cells)
    assert line.startswith(TIME_LINE)
    assert "about 10 min to read" in line  # 1,302 words at 200 a minute: 6.5 min, rounded up to 10
    assert "about 25 s to run" in line  # 21 s, rounded up to a multiple of 5
    assert "deep dives add about 2 min" in line  # 300 words
    untimed = dict(cells[2], metadata={"tags": []})
    assert "measured when it is next executed whole" in time_line([prose, untimed])


def test_the_writer_replaces_an_old_time_line():
    cell = {"cell_type": "markdown", "metadata": {"tags": [OBJECTIVES]},
            "source": "## In this chapter\n\n- do it\n\n**Time:** stale"}  # fmt: skip
    chapter_cells._write_time(cell, [cell])
    assert "stale" not in cell["source"] and cell["source"].count(TIME_LINE) == 1


def test_statements_count_logical_lines_not_the_formatter_layout():
    spread = "x = f(\n    1,\n    2,\n)\ny = 3  # a comment\n\n# only a comment\n"
    assert statements(spread) == 2
    assert statements("\n".join(f"a{i} = {i}" for i in range(31))) == 31
