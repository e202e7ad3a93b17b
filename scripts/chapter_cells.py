"""Write the cells every chapter shares, from the repository URL in _config.yml.

Each chapter notebook starts with its title cell, then three standard cells:

1. ``badge``: an "Open in Colab" badge linking to this notebook on GitHub;
2. ``colab-setup``: installs lora_lab on Colab only (tagged ``hide-output``),
   pinning torch to the version Colab already has so it is never reinstalled;
3. ``environment``: prints versions, picks the device and seeds everything.

Run ``python scripts/chapter_cells.py`` after changing the URL or adding a
chapter; ``--check`` exits non-zero if any notebook is out of date (a test
runs that). Cells are found by their ``lora-lab:`` tag and rewritten in place.
"""

import argparse
import base64
import json
import math
import sys
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TAG = "lora-lab:"

# A small badge drawn for this course; embedded as a data URI so it shows
# offline, in the book, in Jupyter and on GitHub alike.
BADGE_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" \
aria-label="Open in Colab"><rect width="117" height="20" rx="3" fill="#555"/>\
<rect x="38" width="79" height="20" rx="3" fill="#f9ab00"/><rect x="38" width="6" height="20" \
fill="#f9ab00"/><circle cx="13" cy="10" r="5" fill="none" stroke="#f9ab00" stroke-width="3"/>\
<circle cx="24" cy="10" r="5" fill="none" stroke="#e8710a" stroke-width="3"/>\
<text x="77" y="14" fill="#fff" font-family="Verdana,sans-serif" font-size="11" \
text-anchor="middle">Open in Colab</text></svg>"""


def repository():
    """(owner/name URL without trailing slash, branch) from _config.yml."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config.get("repository") or {}
    url, branch = repo.get("url"), repo.get("branch", "main")
    if not url or not url.startswith("https://github.com/"):
        raise SystemExit(
            f"_config.yml: repository.url must be a https://github.com/ URL, got {url!r}"
        )
    return url.rstrip("/"), branch


def colab_url(url, branch, notebook):
    """The Colab address that opens ``notebook`` from the repository."""
    path = notebook.relative_to(ROOT).as_posix()
    return f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/{path}"


def standard_cells(url, branch, notebook):
    """The three standard cells for one notebook, as nbformat-style dicts."""
    data = base64.b64encode(BADGE_SVG.encode()).decode()
    badge = (
        f'<a href="{colab_url(url, branch, notebook)}">'
        f'<img src="data:image/svg+xml;base64,{data}" alt="Open In Colab" width="117" height="20"/></a>'
    )
    setup = (
        "# On Colab, install lora_lab from the course repository. torch is pinned to\n"
        "# the version Colab already has, so it is never reinstalled. Elsewhere this\n"
        "# cell does nothing: a local install follows the README.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import torch\n"
        "\n"
        f'    !pip install -q "lora-lab @ git+{url}@{branch}" "torch=={{torch.__version__}}"'
    )
    environment = (
        "import lora_lab\n"
        "from lora_lab import get_device, set_seed\n"
        "\n"
        "lora_lab.print_versions()\n"
        "device = get_device()  # CUDA if present, else Apple's MPS, else the CPU\n"
        "set_seed(0)"
    )
    return [
        _cell("markdown", badge, ["badge"]),
        _cell("code", setup, ["colab-setup", "hide-output"]),
        _cell("code", environment, ["environment"]),
    ]


def _cell(kind, source, tags):
    names = [TAG + tags[0]] + tags[1:]
    cell = {"cell_type": kind, "id": tags[0], "metadata": {"tags": names}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _tag(cell):
    for tag in cell.get("metadata", {}).get("tags", []):
        if tag.startswith(TAG):
            return tag
    return None


def update(notebook, url, branch):
    """Return the notebook's JSON with its standard cells written; keep outputs of unchanged cells."""
    nb = json.loads(notebook.read_text())
    cells = nb["cells"]
    if not cells or cells[0]["cell_type"] != "markdown":
        raise SystemExit(f"{notebook.name}: the first cell must be the markdown title cell")
    existing = {_tag(c): c for c in cells if _tag(c)}
    rest = [c for c in cells[1:] if not _tag(c)]
    fresh = []
    for cell in standard_cells(url, branch, notebook):
        old = existing.get(_tag(cell))
        if (
            old is not None
            and _source(old) == cell["source"]
            and old["metadata"].get("tags") == cell["metadata"]["tags"]
        ):
            fresh.append(old)  # unchanged: keep its id and outputs
        else:
            fresh.append(cell)
    nb["cells"] = [cells[0], *fresh, *rest]
    for cell in rest:
        if SOLUTION in cell["metadata"].get("tags", []):
            _hide_solution(cell, notebook)
        if DEEP_DIVE in cell["metadata"].get("tags", []) and cell["cell_type"] == "code":
            _fold(cell)
    objectives = [c for c in rest if OBJECTIVES in c["metadata"].get("tags", [])]
    if len(objectives) > 1:
        raise SystemExit(
            f"{notebook.name}: {len(objectives)} cells tagged {OBJECTIVES!r}, one expected"
        )
    if objectives:
        _write_time(objectives[0], cells)
    # widget state would make the book load widget code from a CDN; a widget
    # comes alive only in a running kernel, and each is followed by a static figure
    nb["metadata"].pop("widgets", None)
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


SOLUTION = "solution"  # the tag of an exercise's solution cell
OBJECTIVES = "objectives"  # the tag of the cell saying what the learner will be able to do
DEEP_DIVE = "deep-dive"  # the tag of every cell of a folded expert detour
TIME_LINE = "**Time:**"
WORDS_PER_MINUTE = 200  # a common reading speed for technical prose


def words(cell):
    """Words a reader reads in a cell: its text, and for code its source (not its output)."""
    return len(_source(cell).split())


def cell_seconds(cell):
    """Seconds a code cell took in the committed run (nbclient's timestamps), or None."""
    ex = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" not in ex or "shell.execute_reply" not in ex:
        return None
    start, end = (
        datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
        for k in ("iopub.execute_input", "shell.execute_reply")
    )
    return (end - start).total_seconds()


def chapter_time(cells):
    """(reading minutes on the main path, reading minutes in deep dives, running seconds or None).

    Reading counts every word of prose and code at WORDS_PER_MINUTE, solutions excluded (a
    learner writes those); running is the sum of the committed run's cell times, None when a
    code cell has no timing (the notebook was not executed whole).
    """
    main = dive = 0
    for cell in cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if SOLUTION in tags or _tag(cell):
            continue
        if DEEP_DIVE in tags:
            dive += words(cell)
        else:
            main += words(cell)
    times = [cell_seconds(c) for c in cells if c["cell_type"] == "code" and _source(c).strip()]
    running = None if any(t is None for t in times) else sum(times)
    return main / WORDS_PER_MINUTE, dive / WORDS_PER_MINUTE, running


def time_line(cells):
    """The objectives cell's last line, from the chapter's words and its committed run."""
    main, dive, running = chapter_time(cells)
    read = max(5, 5 * math.ceil(main / 5))
    if running is None:
        run = "its running time is measured when it is next executed whole"
    else:
        run = f"about {max(5, 5 * math.ceil(running / 5))} s to run on a 2-core laptop CPU"
    line = (
        f"{TIME_LINE} about {read} min to read ({WORDS_PER_MINUTE} words a minute) and {run} "
        "(the committed run)"
    )
    if dive:
        line += f"; the folded deep dives add about {max(1, math.ceil(dive))} min of reading"
    return line + "."


def _write_time(cell, cells):
    if cell["cell_type"] != "markdown":
        raise SystemExit(f"the cell tagged {OBJECTIVES!r} must be markdown")
    kept = [ln for ln in _source(cell).rstrip("\n").split("\n") if not ln.startswith(TIME_LINE)]
    while kept and not kept[-1].strip():
        kept.pop()
    cell["source"] = "\n".join(kept + ["", time_line(cells)])


def _fold(cell):
    """A deep dive's code is folded: in the book (hide-cell) and in Jupyter (source_hidden)."""
    if "hide-cell" not in cell["metadata"]["tags"]:
        cell["metadata"]["tags"].append("hide-cell")
    cell["metadata"].setdefault("jupyter", {})["source_hidden"] = True


SOLUTION_NOTE = "Run this cell to see the checker's verdict."


def _hide_solution(cell, notebook):
    """A solution shows no answer until the learner runs it: no committed output, input folded.

    CI still runs it: its last line calls the checker's ``.require()``, which raises when the
    solution is wrong.
    """
    if cell["cell_type"] != "code" or ".require()" not in _source(cell):
        raise SystemExit(
            f"{notebook.name}: a cell tagged {SOLUTION!r} must be code that calls "
            "check.<exercise>(...).require()"
        )
    if "NBVAL_CHECK_OUTPUT" in _source(cell):
        raise SystemExit(f"{notebook.name}: a solution's output is not committed, so not checked")
    cell["outputs"], cell["execution_count"] = [], None
    for tag in ("hide-input",):
        if tag not in cell["metadata"]["tags"]:
            cell["metadata"]["tags"].append(tag)
    cell["metadata"]["jupyter"] = {"source_hidden": True}  # Jupyter folds the input too


def _source(cell):
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def chapters():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="only these notebooks (default: every chapter)"
    )
    args = parser.parse_args(argv)
    url, branch = repository()
    chosen = [p.resolve() for p in args.notebooks]
    for path in chosen:
        if path.parent != NOTEBOOKS or path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"notebooks: {str(path)!r} is not a notebook in {NOTEBOOKS}")
    stale = []
    for notebook in chosen or chapters():
        text = update(notebook, url, branch)
        if text != notebook.read_text():
            stale.append(notebook.name)
            if not args.check:
                tmp = notebook.with_suffix(".ipynb.tmp")
                tmp.write_text(text)
                tmp.replace(notebook)
    if args.check and stale:
        print("out of date (run python scripts/chapter_cells.py):", ", ".join(stale))
        return 1
    for name in stale:
        print("updated", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
