"""Headless Debian chromium for the page tests, driven by Playwright (no browser download).

`.ci/run` installs chromium with apt; the tests open pages from file:// with every other
request refused, collect console errors and uncaught exceptions, and save screenshots
under test-artifacts/.
"""

import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Flags of a quiet offline headless run: no GPU, no background network, a fresh profile.
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does it)")
    return path


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        yield b
        b.close()


class Page:
    """A page opened from a file with the network off; `errors` collects console errors,
    uncaught exceptions and any request that tried to leave the file."""

    def __init__(self, browser, path: Path, width: int = 1400, height: int = 1000):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

        def route(r):
            if r.request.url.startswith("file://"):
                return r.continue_()
            self.errors.append(f"network request: {r.request.url}")
            return r.abort()

        self.page.route("**/*", route)
        self.page.goto(Path(path).resolve().as_uri())
        self.page.wait_for_load_state("load")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        out = ARTIFACTS / name
        self.page.screenshot(path=str(out), full_page=True)
        return out

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def open_page(browser):
    """open_page(path) -> Page; closed after the test."""
    pages = []

    def opener(path, **kw) -> Page:
        pages.append(Page(browser, path, **kw))
        return pages[-1]

    yield opener
    for p in pages:
        p.close()
