"""Build the book, and inspect its pages in a real browser.

``build`` is the one definition of how the book is built: ``make book`` runs
``python -m tests.book build`` and tests/test_book.py calls ``build`` with
only the output folder changed, so the test checks the book users get. By
default the pages show the outputs committed in the notebooks (nbval checks
them); ``--execute`` (``make book EXECUTE=1``) executes the notebooks first.

The page checks are kept here, apart from the tests, so that they can be run
on a page with a fault put in on purpose (a test must be able to fail).
"""

import argparse
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# read by _ext/book_fixes.py: "1" executes the notebooks (cached), "0" does not
EXECUTE_VAR = "LORA_LAB_EXECUTE"
# pages Sphinx writes besides those in _toc.yml (index.html redirects to the root)
EXTRA_PAGES = ["index", "search", "genindex"]
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
    # no request ever leaves this machine, even where there is a network
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
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


class BuildError(RuntimeError):
    pass


def build_command(output=ROOT):
    """The jupyter-book command line that builds the HTML book into ``output``/_build/html."""
    return [
        str(Path(sys.executable).with_name("jupyter-book")),
        "build",
        str(ROOT),
        "--path-output",
        str(output),
        "-W",
        "-n",
        "--keep-going",
    ]


def build(output=ROOT, execute=False, capture=True):
    """Build the book into ``output``/_build/html, warnings as errors; return that folder.

    ``execute=False`` shows the committed outputs whatever the environment
    says; ``execute=True`` executes the notebooks, cached in the build folder.
    """
    from scripts import vendor_mathjax  # MathJax is served from the book

    vendor_mathjax.main()
    env = {**os.environ, EXECUTE_VAR: "1" if execute else "0"}
    run = subprocess.run(
        build_command(output), cwd=ROOT, env=env, capture_output=capture, text=True
    )
    if run.returncode != 0:
        detail = f":\n{run.stdout[-6000:]}\n{run.stderr[-4000:]}" if capture else ""
        raise BuildError(f"jupyter-book build failed (exit {run.returncode}){detail}")
    return Path(output) / "_build" / "html"


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


# a page may use these without asking any host for anything
LOCAL_SCHEMES = ("data:", "blob:", "about:")


def is_external(url, site):
    """Whether fetching ``url`` asks another host than the book's server ``site``."""
    return not url.startswith(site) and not url.startswith(LOCAL_SCHEMES)


class Visit:
    """One page opened in the browser, with what it asked for and what went wrong.

    ``external``: every request the page made to another host (none may be:
    the book must read offline); they fail, as Chromium resolves no host name
    but 127.0.0.1 (CHROMIUM_ARGS).
    ``errors``: console errors from the book's own assets, uncaught
    exceptions and the book's own requests that failed.
    """

    def __init__(self, browser, site, path):
        self.site = site
        self.external = []
        self.errors = []
        self.page = page = browser.new_page()
        page.on("request", self._on_request)
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("requestfailed", self._on_failed)
        page.on("response", self._on_response)
        self.response = page.goto(site + path, wait_until="load")

    def _on_request(self, request):
        if is_external(request.url, self.site):
            self.external.append(request.url)

    def _on_console(self, msg):
        if msg.type == "error" and (msg.location.get("url") or self.site).startswith(self.site):
            self.errors.append(msg.text)

    def _on_response(self, response):
        # a 404 shows in the console without its address; name it here
        if response.status >= 400 and not is_external(response.url, self.site):
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def _on_failed(self, request):
        if not is_external(request.url, self.site):
            self.errors.append(f"failed: {request.url}")

    def external_requests(self):
        """Once the page has gone quiet: one problem per request made to another host."""
        self.page.wait_for_load_state("networkidle")
        return [f"external request: {url}" for url in self.external]

    def close(self):
        self.page.close()


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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tests.book", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["build"])
    parser.add_argument(
        "--execute",
        action="store_true",
        help="execute the notebooks (cached) instead of showing their committed outputs",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT, help="folder to hold _build/ (default: the repository)"
    )
    args = parser.parse_args(argv)
    try:
        html = build(args.output.resolve(), execute=args.execute, capture=False)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"The book is built: open file://{html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
