"""Print pip constraints that hold each dependency of pyproject.toml to its declared floor.

    python scripts/floors.py > floors.txt && pip install -c floors.txt -e ".[test]"

``.ci/floors`` uses it to run the quick tests with the oldest versions the package promises
to work with, so a floor is a tested claim, not a guess. torch is left out (``--keep torch``):
its floor is checked by ``tests/test_floors.py`` against what the code uses, and the CPU build
installed first is kept.
"""

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib  # Python 3.11+; this script is a maintainer's tool
except ImportError:  # pragma: no cover
    raise SystemExit("scripts/floors.py needs Python 3.11 or newer (tomllib)") from None

ROOT = Path(__file__).resolve().parents[1]
FLOOR = re.compile(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,.*)?$")


def floors(extras=("test",)):
    """``{name: floor}`` for the dependencies and the given extras that declare ``>=``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            raise ValueError(
                f"extras: {extra!r} is not an extra of pyproject.toml; valid: "
                f"{sorted(project['optional-dependencies'])}"
            )
        specs += project["optional-dependencies"][extra]
    found = {}
    for spec in specs:
        match = FLOOR.match(spec.split(";")[0].strip())
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="append", default=[], help="a package left unpinned")
    args = parser.parse_args(argv)
    for name, version in floors().items():
        if name not in args.keep:
            print(f"{name}=={version}.*")  # the floor's series: its patch releases
    return 0


if __name__ == "__main__":
    sys.exit(main())
