"""Settings for every pytest run here: unit tests, nbval and the book test."""

import os

# transformers and the hub must never try the network; nbval's kernels inherit this
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")


# ----------------------------------------------------------------------------- chapter times
# nbval runs each notebook in its own kernel, which ends (and is reaped) when the notebook's
# last cell is torn down. Wall seconds run from the first cell's set-up to that point; CPU
# seconds are the kernel's (a reaped child) plus this process's own over the same span.

import resource  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

CHAPTER_BUDGET_S, COURSE_BUDGET_S = 60, 360  # COURSE.md: per chapter, and all chapters
_times = {}  # notebook -> [wall start, cpu start, wall s, cpu s]


def _cpu():
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _notebook(item):
    path = str(getattr(item, "path", getattr(item, "fspath", "")))
    return path if path.endswith(".ipynb") else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    name = _notebook(item)
    if name and name not in _times:
        _times[name] = [time.perf_counter(), _cpu(), None, None]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    name = _notebook(item)
    if name and (nextitem is None or _notebook(nextitem) != name):  # the kernel has ended
        start = _times[name]
        start[2], start[3] = time.perf_counter() - start[0], _cpu() - start[1]


def pytest_terminal_summary(terminalreporter):
    done = {k: v for k, v in _times.items() if v[2] is not None}
    if not done:
        return
    tr = terminalreporter
    tr.section("chapter times (nbval)")
    tr.write_line(f"load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tr.write_line(f"{'notebook':<40} {'wall s':>7} {'CPU s':>7}")
    for name, (_, _, wall, cpu) in done.items():
        flag = "  OVER the 60 s budget" if wall > CHAPTER_BUDGET_S else ""
        tr.write_line(f"{os.path.basename(name):<40} {wall:7.1f} {cpu:7.1f}{flag}")
    wall, cpu = sum(v[2] for v in done.values()), sum(v[3] for v in done.values())
    flag = "  OVER the 360 s budget" if wall > COURSE_BUDGET_S else ""
    tr.write_line(f"{'total':<40} {wall:7.1f} {cpu:7.1f}{flag}")
