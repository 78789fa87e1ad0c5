"""Steps on the playground page shared by the browser tests: open it, wait for runs, read lanes.

Imported only by tests that have already skipped themselves when selenium is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from selenium.webdriver.common.by import By


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Polls ``condition`` until it returns something truthy (the runs take a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: driver.find_element(By.ID, "run").is_enabled(), what="the models to load")


def finish(driver: Any, runs: int) -> list[Any]:
    def done() -> list[Any] | None:
        panels = driver.find_elements(By.CSS_SELECTOR, ".run")
        if len(panels) == runs and all(p.get_attribute("data-outcome") for p in panels):
            return panels
        return None

    panels: list[Any] = wait_for(done, what="the runs to end")
    assert [p.get_attribute("data-outcome") for p in panels] == ["done"] * runs
    return panels


def lanes(panel: Any) -> dict[str, Any]:
    return {
        lane.get_attribute("data-agent"): lane
        for lane in panel.find_elements(By.CSS_SELECTOR, ".lane.proposer")
    }
