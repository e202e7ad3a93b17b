"""The built book, opened page by page in headless Chromium.

The book is built once per session from the committed notebook outputs (no
execution: nbval already ran them), then every page in _toc.yml is loaded.
"""

import os

import pytest

from tests import book

pytestmark = pytest.mark.browser

PAGES = book.toc_pages()


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    html = book.build(tmp_path_factory.mktemp("book"))
    with book.Server(html) as server:
        yield server.url


@pytest.fixture(scope="session")
def browser():
    if not book.CHROMIUM.exists():
        if os.environ.get("LORA_LAB_SKIP_BROWSER") == "1":
            pytest.skip("LORA_LAB_SKIP_BROWSER=1 and no /usr/bin/chromium")
        pytest.fail("no /usr/bin/chromium: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(book.CHROMIUM), args=book.CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, site, page_path):
    """Open one page; return it and the console errors raised by the book's own assets."""
    page = browser.new_page()
    errors = []

    def on_console(msg):
        if msg.type == "error" and (msg.location.get("url") or site).startswith(site):
            errors.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda req: req.url.startswith(site) and errors.append(f"failed: {req.url}"))
    # the book must read offline: nothing may be fetched from another host
    page.on("request", lambda req: req.url.startswith(("http:", "https:"))
            and not req.url.startswith(site) and errors.append(f"external request: {req.url}"))
    response = page.goto(site + page_path + ".html", wait_until="load")
    assert response is not None and response.ok, f"{page_path}.html: HTTP {response and response.status}"
    return page, errors


@pytest.mark.parametrize("page_path", PAGES)
def test_page(browser, site, page_path):
    page, errors = open_page(browser, site, page_path)
    is_notebook = page_path.startswith("notebooks/")
    problems = book.page_problems(
        page,
        expect_title=book.source_title(page_path),
        colab=book.colab_link(page_path) if is_notebook else None,
        own_errors=errors,
    )
    if is_notebook:
        if page.locator(".math").count() == 0:
            problems.append("a chapter page with no typeset math")
        if page.locator("img").count() < 2:
            problems.append("a chapter page with no figure besides the badge")
    page.close()
    assert not problems, "\n".join(problems)


def test_checks_catch_a_missing_figure(browser, site):
    """The page checks must fail on a page whose figure does not load."""
    chapter = next(p for p in PAGES if p.startswith("notebooks/"))
    page, errors = open_page(browser, site, chapter)
    page.evaluate(
        """() => new Promise(done => {
            const img = document.createElement('img');
            img.onerror = done; img.onload = done;
            img.src = 'this-figure-does-not-exist.png';
            document.querySelector('main').appendChild(img);
        })"""
    )
    problems = book.page_problems(page, expect_title=book.source_title(chapter), own_errors=errors)
    page.close()
    assert any("this-figure-does-not-exist.png" in p for p in problems), problems
    assert any("404" in e for e in errors), f"the 404 was not seen as a console error: {errors}"


def test_colab_badges_follow_the_config():
    """Every chapter's standard cells are what scripts/chapter_cells.py writes from _config.yml."""
    from scripts import chapter_cells

    assert chapter_cells.main(["--check"]) == 0
