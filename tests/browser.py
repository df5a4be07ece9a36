"""A headless browser for the UI tests: Debian's chromium driven by the playwright package. Importing this
skips the importing test module where either is missing."""

import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("NANOPIPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
WAIT_MS = 60_000   # pages' and expect()'s timeout: a loaded machine renders slowly

_playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                  "(pip install -e '.[dev]')")
expect = _playwright.expect
expect.set_options(timeout=WAIT_MS)
if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: install it with `bash scripts/install_browser.sh` (apt, as root) "
                f"or point NANOPIPE_CHROMIUM at one", allow_module_level=True)


@contextlib.contextmanager
def browser_page(**options):
    """A new page of a freshly launched browser (closed on the way out); options go to new_page."""
    with _playwright.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(**options)
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()
