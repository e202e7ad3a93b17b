"""Build the book from committed outputs and inspect its pages in a real browser.

Used by tests/test_book.py. Kept apart so the page checks can be tested on a
page with a fault put in on purpose (the test must be able to fail).
"""

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def toc_pages():
    """The book's pages in order, as paths without suffix (e.g. 'notebooks/02_low_rank_intuition')."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part.get("chapters", [])]
    return pages


def source_title(page):
    """The first heading of a page's source (markdown file or notebook)."""
    md = ROOT / f"{page}.md"
    if md.exists():
        lines = md.read_text().splitlines()
    else:
        nb = json.loads((ROOT / f"{page}.ipynb").read_text())
        first = nb["cells"][0]["source"]
        lines = ("".join(first) if isinstance(first, list) else first).splitlines()
    for line in lines:
        if line.startswith("# "):
            return line[2:].strip()
    raise AssertionError(f"{page}: no '# ' title line in its source")


def build(out_dir):
    """Build the HTML book into ``out_dir`` with execution off and warnings as errors."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # use the committed outputs
    # the config is written elsewhere, so make its paths absolute
    sphinx = config["sphinx"]
    sphinx["config"]["html_static_path"] = [str(ROOT / p) for p in sphinx["config"]["html_static_path"]]
    sphinx["local_extensions"] = {k: str(ROOT / v) for k, v in sphinx["local_extensions"].items()}
    config["html"]["favicon"] = str(ROOT / config["html"]["favicon"])
    cfg = Path(out_dir) / "_config.yml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT),
        "--config", str(cfg), "--path-output", str(out_dir), "-W", "-n", "--keep-going",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise AssertionError(f"jupyter-book build failed:\n{run.stdout[-6000:]}\n{run.stderr[-4000:]}")
    return Path(out_dir) / "_build" / "html"


class Server:
    """Serve a folder on 127.0.0.1 on a free port, in a background thread."""

    def __init__(self, folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def colab_link(page):
    """Where the Colab launch link of a notebook page must point."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    owner_name = repo["url"].rstrip("/").removeprefix("https://github.com/")
    prefix = repo.get("path_to_book", "").strip("/")
    path = f"{prefix}/{page}.ipynb" if prefix else f"{page}.ipynb"
    return f"https://colab.research.google.com/github/{owner_name}/blob/{repo['branch']}/{path}"


BROKEN_IMAGES_JS = """() => Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.getAttribute('src').slice(0, 80))"""

UNTYPESET_MATH_JS = """() => Array.from(document.querySelectorAll('.math'))
    .filter(el => !el.querySelector('mjx-container'))
    .map(el => el.textContent.slice(0, 60))"""


def page_problems(page, expect_title, colab=None, own_errors=()):
    """Everything wrong with a loaded page, as a list of strings (empty when all is well)."""
    problems = []
    title = page.title()
    if expect_title not in title or "LoRA Lab" not in title:
        problems.append(f"title {title!r} lacks {expect_title!r} or 'LoRA Lab'")
    problems += [f"console error from the book: {e}" for e in own_errors]
    problems += [f"figure not loaded: {src}" for src in page.evaluate(BROKEN_IMAGES_JS)]
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    page.evaluate("() => MathJax.startup.promise")
    problems += [f"math not typeset: {tex!r}" for tex in page.evaluate(UNTYPESET_MATH_JS)]
    if colab is not None:
        links = page.eval_on_selector_all(
            "a[href^='https://colab.research.google.com/']", "els => els.map(e => e.href)"
        )
        if not links:
            problems.append("no Colab link on a notebook page")
        problems += [f"Colab link {link} is not {colab}" for link in links if link != colab]
    text = page.inner_text("body")
    for bad in ("Traceback (most recent call last)", "kernels-community", "Warning:"):
        if bad in text:
            problems.append(f"page text contains {bad!r}")
    return problems
