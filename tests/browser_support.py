"""Browser tests' shared pieces: Debian's headless Chromium driven by Playwright (never a Playwright download), a page
wrapper that records console errors and every URL asked for (only the page's own origin allowed: no CDN), polling
without eval (the pages' Content-Security-Policy forbids it) and screenshots (into docs/img/ with
FAR_MESH_UPDATE_SCREENSHOTS=1).

Used by tests/test_dashboard.py (provider dashboard, discovery) and tests/test_user_page.py (user page,
coordinator). A module imports the fixtures it uses: ``from tests.browser_support import browser, chromium``."""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from infra.processes import wait_until
from services.common.money import format_far

ROOT = Path(__file__).resolve().parent.parent
# Screenshots are always taken (the capture path is tested); they replace the committed ones in docs/img/ only when
# asked (FAR_MESH_UPDATE_SCREENSHOTS=1), so that a test run leaves the working tree as it found it.
IMG_DIR = (ROOT / "docs" / "img" if os.environ.get("FAR_MESH_UPDATE_SCREENSHOTS") == "1"
           else Path(tempfile.gettempdir()) / "far-mesh-screenshots")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def far(value) -> str:
    """What the pages show for an amount: the API's exact decimal string, integer part grouped (never a float)."""
    text = format_far(value)
    whole, _, frac = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}" + (f".{frac}" if frac else "")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by scripts/ensure_debian_tools.sh when missing. Never a Playwright download."""
    if not os.access(CHROMIUM, os.X_OK):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_debian_tools.sh"), f"{CHROMIUM}=chromium"],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"the browser tests need {CHROMIUM} (Debian package 'chromium') and "
                        f"scripts/ensure_debian_tools.sh could not install it (exit {result.returncode}):\n"
                        f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover
        pytest.fail("playwright (PyPI) is missing: run `make install` (requirements/base.in)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A Playwright page that records console errors and every URL it asks for (only our origin allowed)."""

    def __init__(self, browser, base: str, viewport: dict):
        self.base = base
        self.context = browser.new_context(viewport=viewport, device_scale_factor=1, service_workers="block")
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: str, *, wait_state: str | None = "ok"):
        response = self.page.goto(self.base + path, wait_until="load")
        if wait_state:
            self.page.wait_for_selector(f"body[data-state='{wait_state}']")
        return response

    def refreshes(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.refreshes || 0)"))

    def wait_refresh(self, after: int | None = None):
        """Wait for a complete refresh after the current one (the auto-refresh timer, ?refresh=1)."""
        count = self.refreshes() if after is None else after
        self.wait_js(f"Number(document.body.dataset.refreshes || 0) > {count} && !document.body.dataset.loading")

    def wait_js(self, expression: str, timeout: float = 15.0):
        """Poll a JS expression until truthy (page.wait_for_function evaluates strings with eval(), which the
        dashboard's Content-Security-Policy forbids, as it should)."""
        wait_until(lambda: self.page.evaluate(f"() => Boolean({expression})"), timeout=timeout, interval=0.1,
                   what=expression)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def assert_clean(self):
        assert not self.errors, f"browser console errors: {self.errors}"
        foreign = [u for u in self.requests if not u.startswith(self.base) and not u.startswith("data:")]
        assert not foreign, f"the page fetched something not from its own origin (no CDN allowed): {foreign}"

    def screenshot(self, name: str, full_page: bool = True):
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(IMG_DIR / name), full_page=full_page)

    def close(self):
        self.context.close()


@contextmanager
def pages_of(browser, url: str):
    """A ``make(viewport=DESKTOP) -> Page`` for the pages of ``url`` (the ``open_page`` fixtures); closes them all."""
    pages = []

    def make(viewport=DESKTOP) -> Page:
        page = Page(browser, url, viewport)
        pages.append(page)
        return page

    try:
        yield make
    finally:
        for page in pages:
            page.close()
