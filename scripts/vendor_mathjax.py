"""Copy MathJax 3 into _vendor/mathjax so the book typesets math offline.

The files come from the `django-static-mathjax` wheel (a plain copy of the
MathJax 3 release, in the "book" extra of pyproject.toml); nothing is committed.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "_vendor" / "mathjax"
# the speech-rule engine and the "-full" bundles are large and not used
SKIP = shutil.ignore_patterns("sre", "*-full*.js", "*speech*")


def main():
    try:
        import mathjax
    except ImportError:
        sys.exit("vendor_mathjax: install django-static-mathjax (pip install -e .[book])")
    source = Path(mathjax.__path__[0]) / "static" / "mathjax" / "es5"
    if not (source / "tex-chtml.js").is_file():
        sys.exit(f"vendor_mathjax: no tex-chtml.js under {source}")
    if (TARGET / "tex-chtml.js").is_file():
        return
    TARGET.parent.mkdir(exist_ok=True)
    tmp = TARGET.with_name("mathjax.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=SKIP)
    tmp.replace(TARGET)  # whole or not at all
    print(f"vendor_mathjax: copied MathJax to {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
