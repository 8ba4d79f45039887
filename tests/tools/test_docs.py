"""The docs site: every public name has its API entry, every test id on the reliability page exists,
and (slow) the site builds with ``mkdocs build --strict`` and works in a real headless browser.

The browser is Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it), driven
by playwright with ``executable_path`` (playwright downloads no browser of its own here).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
PUBLIC = ("torchkeel", "torchkeel.callbacks", "torchkeel.checkpoint", "torchkeel.distributed", "torchkeel.loggers",
          "torchkeel.parallel", "torchkeel.checkpoint.dcp", "torchkeel.tools.export", "torchkeel.tune",
          "torchkeel.integrations")
GUIDES = sorted(p.stem for p in (DOCS / "guides").glob("*.md"))


def test_every_test_id_on_the_reliability_page_exists() -> None:
    page = (DOCS / "guides" / "reliability.md").read_text()
    ids = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", page)
    assert len(ids) >= 50
    missing = [f"{f}::{t}" for f, t in ids
               if not (ROOT / f).is_file() or not re.search(rf"^def {t}\(", (ROOT / f).read_text(), re.MULTILINE)]
    assert missing == []


def test_every_guide_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [g for g in GUIDES if f"guides/{g}.md" not in nav] == []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict`` (a warning fails it)."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.slow
def test_the_site_builds_strictly_and_documents_every_public_name(site: Path) -> None:
    html = "\n".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    anchors = set(re.findall(r'id="(torchkeel[\w.]*)"', html))
    missing = []
    for module in PUBLIC:
        for name in importlib.import_module(module).__all__:
            if f"{module}.{name}" not in anchors and f"torchkeel.{name}" not in anchors:
                missing.append(f"{module}.{name}")
    assert missing == []
    assert (site / "guides" / "reliability" / "index.html").is_file()


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_real_browser_renders_navigates_searches_and_shows_the_api(served: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright  # pip install playwright (in the dev extra)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        page.goto(served + "/")
        assert page.title().startswith("torchkeel")
        assert page.locator("h1").first.inner_text().startswith("torchkeel")
        assert page.locator("table").first.is_visible()                 # the claims table
        page.screenshot(path=str(tmp_path / "home.png"), full_page=False)

        for guide in GUIDES:                                             # the navigation reaches each guide
            page.goto(served + "/")
            link = page.locator(f'nav.md-nav--primary a[href$="guides/{guide}/"]').first
            title = link.inner_text().strip()
            link.evaluate("a => a.click()")                              # collapsed sections are hidden
            page.wait_for_url(re.compile(rf".*/guides/{guide}/$"))
            assert page.locator("article h1").first.inner_text().strip(), guide
            assert title, guide

        page.goto(served + "/")
        search = page.locator("input.md-search__input")
        search.click()
        # Material builds the index in a web worker ("Initializing search" until then), and a query set
        # at once (fill) before or as it becomes ready was sometimes never run: wait, then type it
        page.wait_for_function("document.querySelector('.md-search-result__meta')"
                               ".textContent.includes('Type to start')", timeout=120_000)
        search.press_sequentially("ModelCheckpoint", delay=20)
        results = page.locator(".md-search-result__item")
        results.first.wait_for(timeout=60_000)
        assert results.count() >= 3
        page.screenshot(path=str(tmp_path / "search.png"))

        page.goto(served + "/reference/torchkeel/")
        doc = page.locator('[id="torchkeel.AdvancedTrainer"]').first
        doc.wait_for()
        text = page.locator("article").inner_text()
        assert "A complete training loop: AMP, accumulation, clipping, schedules, callbacks, checkpoints." in text
        assert "gradient_accumulation_steps" in text
        page.screenshot(path=str(tmp_path / "api.png"))
        browser.close()
    assert errors == []
    keep = ROOT / ".docs-screenshots"          # for a person to look at; ignored by git
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(tmp_path, keep, ignore=shutil.ignore_patterns("*.tmp"))
