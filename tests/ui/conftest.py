"""Fixtures for the browser tests: a ``moa-stream serve`` process, headless Chromium, artifacts.

Chromium and its driver come from Debian's packages (``apt-get install chromium
chromium-driver``) and selenium from the ``ui`` extra; without either the tests are skipped
with the reason. Every test fails if the page logged a JavaScript error.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ui import (
    ARTIFACTS,
    CONFIG,
    Server,
    find_executable,
    page_errors,
    serve,
    start_browser,
)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of Chromium and its driver, or a skip saying how to get them."""
    pytest.importorskip(
        "selenium", reason="selenium is not installed: pip install -e '.[ui]' (make test-ui)"
    )
    browser = find_executable("chromium", "chromium-browser")
    driver = find_executable("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium not found: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(CONFIG) as running:
        yield running


@pytest.fixture(scope="module")
def driver(chromium: tuple[str, str]) -> Iterator[Any]:
    """One headless Chromium per module, with a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="moa-ui-") as profile:
        browser = start_browser(chromium, profile)
        try:
            yield browser
        finally:
            browser.quit()


@pytest.fixture(autouse=True)
def _no_page_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails any test whose page logged a JavaScript error."""
    if "driver" not in request.fixturenames:
        yield
        return
    driver = request.getfixturevalue("driver")
    page_errors(driver)  # what earlier tests left is theirs
    yield
    errors = page_errors(driver)
    assert not errors, f"the page logged errors: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
