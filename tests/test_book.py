"""The built book, opened page by page in headless Chromium.

The book is built once per session by ``book.build``, the function
``make book`` runs, into a temporary folder: from the committed notebook
outputs (no execution: nbval checks them). Then every page is loaded, those
in _toc.yml and those Sphinx adds (index, search, general index), and none
may ask another host for anything.
"""

import os

import pytest
import yaml

from tests import book

pytestmark = pytest.mark.browser

PAGES = book.toc_pages()


@pytest.fixture(scope="session")
def html(tmp_path_factory):
    return book.build(tmp_path_factory.mktemp("book"))


@pytest.fixture(scope="session")
def site(html):
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


def open_page(browser, site, path):
    visit = book.Visit(browser, site, path)
    response = visit.response
    assert response is not None and response.ok, f"{path}: HTTP {response and response.status}"
    return visit


@pytest.mark.parametrize("page_path", PAGES)
def test_page(browser, site, page_path):
    visit = open_page(browser, site, page_path + ".html")
    page = visit.page
    is_notebook = page_path.startswith("notebooks/")
    problems = book.page_problems(
        page,
        expect_title=book.source_title(page_path),
        colab=book.colab_link(page_path) if is_notebook else None,
        own_errors=visit.errors,
    )
    if is_notebook:
        if page.locator(".math").count() == 0:
            problems.append("a chapter page with no typeset math")
        if page.locator("img").count() < 2:
            problems.append("a chapter page with no figure besides the badge")
    problems += visit.external_requests()
    visit.close()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page_path", book.EXTRA_PAGES)
def test_extra_page(browser, site, page_path):
    """The pages Sphinx adds load cleanly too: index leads to the first page, search finds chapters."""
    query = "?q=LoRA" if page_path == "search" else ""
    visit = open_page(browser, site, page_path + ".html" + query)
    page = visit.page
    if page_path == "index":  # a redirect to the first page
        page.wait_for_url(site + PAGES[0] + ".html", wait_until="load")
    if page_path == "search":
        page.wait_for_selector("#search-results ul li", timeout=15_000)
    problems = [f"console error from the book: {e}" for e in visit.errors]
    problems += [f"figure not loaded: {src}" for src in page.evaluate(book.BROKEN_IMAGES_JS)]
    if "LoRA Lab" not in page.title():
        problems.append(f"title {page.title()!r} lacks 'LoRA Lab'")
    problems += visit.external_requests()
    visit.close()
    assert not problems, "\n".join(problems)


def test_every_built_page_is_visited(html):
    """No page of the build escapes the tests above."""
    built = {str(p.relative_to(html).with_suffix("")) for p in html.rglob("*.html")}
    built = {p for p in built if not p.startswith("_")}  # _static, _sources: not pages
    assert built == set(PAGES) | set(book.EXTRA_PAGES)


def test_checks_catch_an_external_request(browser, tmp_path):
    """A page that loads a script from another host is reported, by the same Visit."""
    (tmp_path / "cdn.html").write_text(
        "<!DOCTYPE html><html><head><title>CDN</title>"
        '<script src="https://cdn.example.com/x.js"></script></head>'
        "<body><p>hello</p></body></html>"
    )
    with book.Server(tmp_path) as server:
        visit = open_page(browser, server.url, "cdn.html")
        problems = visit.external_requests()
        visit.close()
    assert problems == ["external request: https://cdn.example.com/x.js"], problems


def test_checks_catch_a_missing_figure(browser, site):
    """The page checks must fail on a page whose figure does not load."""
    chapter = next(p for p in PAGES if p.startswith("notebooks/"))
    visit = open_page(browser, site, chapter + ".html")
    page = visit.page
    page.evaluate(
        """() => new Promise(done => {
            const img = document.createElement('img');
            img.onerror = done; img.onload = done;
            img.src = 'this-figure-does-not-exist.png';
            document.querySelector('main').appendChild(img);
        })"""
    )
    problems = book.page_problems(
        page, expect_title=book.source_title(chapter), own_errors=visit.errors
    )
    visit.close()
    assert any("this-figure-does-not-exist.png" in p for p in problems), problems
    assert any("404" in e for e in visit.errors), (
        f"the 404 was not seen as a console error: {visit.errors}"
    )


def test_execute_switch(monkeypatch):
    """LORA_LAB_EXECUTE=1 (make book EXECUTE=1) turns execution on; 0 or unset keeps "off"."""
    import types

    from _ext import book_fixes

    assert book_fixes.EXECUTE_VAR == book.EXECUTE_VAR
    config = yaml.safe_load((book.ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off", "make book must not execute by default"
    for value, mode in [(None, "off"), ("0", "off"), ("1", "cache")]:
        if value is None:
            monkeypatch.delenv(book.EXECUTE_VAR, raising=False)
        else:
            monkeypatch.setenv(book.EXECUTE_VAR, value)
        config = types.SimpleNamespace(nb_execution_mode="off")
        book_fixes._execution_mode(None, config)
        assert config.nb_execution_mode == mode, value
    monkeypatch.setenv(book.EXECUTE_VAR, "yes")
    with pytest.raises(ValueError):
        book_fixes._execution_mode(None, types.SimpleNamespace(nb_execution_mode="off"))


def test_colab_badges_follow_the_config():
    """Every chapter's standard cells are what scripts/chapter_cells.py writes from _config.yml."""
    from scripts import chapter_cells

    assert chapter_cells.main(["--check"]) == 0


def test_site_root_serves_a_favicon(site):
    """Browsers ask every site for /favicon.ico; the index redirect has no icon link, so without
    this file its visit logged a 404 now and then (a flaky failure of the index page test)."""
    import urllib.request

    with urllib.request.urlopen(site + "favicon.ico", timeout=10) as response:
        assert response.status == 200
        assert response.read(4) == b"\x00\x00\x01\x00"  # an ICO file


def test_colab_opens_and_installs_the_release_of_this_version():
    """Badge, install cell and the book's launch buttons name one ref: the tag of __version__."""
    import lora_lab
    from scripts import chapter_cells

    url, ref = chapter_cells.repository()
    assert ref == f"v{lora_lab.__version__}", (
        f"_config.yml's repository.branch is {ref!r}; a release of lora_lab "
        f"{lora_lab.__version__} is installed from tag 'v{lora_lab.__version__}' (CONTRIBUTING.md)"
    )
    changelog = (book.ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {lora_lab.__version__} " in changelog, "CHANGELOG.md has no section for it"
    for notebook in chapter_cells.chapters():
        text = notebook.read_text()
        assert f"git+{url}@{ref}" in text and f"/blob/{ref}/notebooks/{notebook.name}" in text
        assert "@main" not in text
