"""The book as a website: it builds without warnings, and every page reads as it should in a browser.

`bash tools/site.sh` builds the site into a temporary folder; the pages are served on localhost and
opened in headless Chromium (Debian's `chromium`, driven by Playwright), as a reader would open them.
tools/test.sh installs all three (jupyter-book and Playwright with the dev extra, Chromium with
tools/browser.sh, which needs root). So a missing one fails these tests in CI (`CI` set) and for root,
where they could have been installed; elsewhere it skips them.
"""
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
MUST_RUN = IN_CI or (hasattr(os, "geteuid") and os.geteuid() == 0)


def require(available: object, what: str) -> None:
    """Fail when `what` is missing in CI or for root (tools/test.sh installs it there), else skip."""
    if available:
        return
    message = f"{what} is missing: bash tools/test.sh installs it"
    if MUST_RUN:
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str | None:
    return os.environ.get("RLSCRATCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by tools/site.sh (warnings are errors there) into a temporary folder."""
    require(importlib.util.find_spec("jupyter_book"), "jupyter-book (the dev extra)")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(["bash", "tools/site.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, f"site build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return out / "_build" / "html"


def test_site_has_every_chapter_and_nothing_else(site: Path) -> None:
    assert CHAPTERS, "no chapters found"
    assert (site / "index.html").is_file() and (site / "README.html").is_file()
    built = sorted(p.stem for p in (site / "chapters").glob("*.html"))
    assert built == CHAPTERS  # the paired scripts in chapters/scripts/ are not pages
    assert not (site / "chapters" / "scripts").exists()
    # each chapter offers its notebook, outputs included, for download
    for name in CHAPTERS:
        page = (site / "chapters" / f"{name}.html").read_text()
        assert f'href="../_sources/chapters/{name}.ipynb"' in page
        source = json.loads((site / "_sources" / "chapters" / f"{name}.ipynb").read_text())
        assert source == json.loads((ROOT / "chapters" / f"{name}.ipynb").read_text())
    # no resource comes from another host: the site works offline (MathJax is shipped with it)
    for page in site.rglob("*.html"):
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', page.read_text())
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def test_readme_is_the_landing_page_and_its_links_work(site: Path) -> None:
    index = (site / "index.html").read_text()
    assert 'url=README.html' in index  # index.html redirects to the README
    readme = (site / "README.html").read_text()
    links = set(re.findall(r'href="(chapters/[^"#]+)"', readme))
    assert {f"chapters/{name}.html" for name in CHAPTERS} <= links
    assert all((site / link).is_file() for link in links), links
    assert ".ipynb" not in "".join(links)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(site: Path):
    """The site served by python's http.server on a free port of 127.0.0.1."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# After load and MathJax's typesetting: what a reader would see of the math and the figures.
PAGE_STATE = """async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  const math = Array.from(document.querySelectorAll('.math'));
  return {
    mathjax: !!(window.MathJax && MathJax.version),
    math: math.length,
    typeset: math.filter(m => m.querySelector('mjx-container')).length,
    // a TeX syntax error, or an undefined macro (MathJax shows its name in red)
    tex_errors: document.querySelectorAll('mjx-merror, mjx-mtext[style*="color: red"]').length,
    images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  };
}"""


def watch(page) -> list[str]:
    """The problems a reader's browser reports on `page`: console errors, script errors, failed requests."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.append(f"script error: {e}"))
    page.on("requestfailed", lambda r: seen.append(f"request failed: {r.url}"))
    page.on("response", lambda r: seen.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    return seen


def test_pages_in_headless_chromium(server: str) -> None:
    """Each page loads without console errors, failed requests or script errors; its math is typeset by
    MathJax without TeX errors, its figures load, its notebook is served; and the search finds chapters."""
    require(importlib.util.find_spec("playwright"), "playwright (the dev extra)")
    chromium = chromium_path()
    require(chromium, "chromium (tools/browser.sh: apt-get install chromium, as root)")
    from playwright.sync_api import sync_playwright

    pages = ["README"] + [f"chapters/{name}" for name in CHAPTERS]
    problems: list[str] = []
    total_math = total_images = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for name in pages:
                page = browser.new_page()
                seen = watch(page)
                page.goto(f"{server}/{name}.html", wait_until="load")
                state = page.evaluate(PAGE_STATE)
                page.wait_for_load_state("networkidle")  # fonts and images MathJax asked for
                if name.startswith("chapters/"):  # the notebook behind the download button is served
                    response = page.request.get(f"{server}/_sources/{name}.ipynb")
                    assert response.ok and "cells" in response.json(), name
                page.close()
                if state["math"]:
                    assert state["mathjax"], f"{name}: MathJax did not load"
                assert state["typeset"] == state["math"], f"{name}: {state['math'] - state['typeset']} math elements not typeset"
                assert state["tex_errors"] == 0, f"{name}: {state['tex_errors']} TeX errors"
                broken = [i["src"] for i in state["images"] if not i["ok"]]
                assert not broken, f"{name}: images did not load: {broken}"
                problems += [f"{name}: {s}" for s in seen]
                total_math += state["math"]
                total_images += sum(1 for i in state["images"] if i["src"].startswith("../_images/"))
            # the search box finds the chapters (its index is built with the site)
            page = browser.new_page()
            seen = watch(page)
            page.goto(f"{server}/search.html?q=advantage", wait_until="load")
            page.wait_for_selector("#search-results li a")
            hits = page.eval_on_selector_all("#search-results li a", "links => links.map(a => a.getAttribute('href'))")
            assert any(h.startswith("chapters/") for h in hits), hits
            page.close()
            problems += [f"search: {s}" for s in seen]
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
    assert total_math > 0 and total_images > 0  # the checks above looked at something
