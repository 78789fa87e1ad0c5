"""The playground page in headless Chromium, against ``moa-stream serve`` on simulated agents.

``tests/ui/playground.toml`` gives the proposers fixed latencies: under ``moa-quorum`` two
finish (about 0.7 s and 1.0 s), one is still streaming when the policy fires (cancelled) and one
fails part-way; ``moa-wait-all`` waits for the slowest (about 2.2 s). Run with ``make test-ui``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.ui import Server, page_errors, serve, start_browser

pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[ui]'")

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from support.playground_page import finish, lanes, open_page, wait_for

pytestmark = pytest.mark.ui

PROMPT = "Why is the sky blue?"
KEY = "sk-playground-test"

# Records, in the page's own clock, when the first policy marker and the first answer text
# appear, and how many separate growths each proposer lane's text had (live streaming shows
# several; text dumped at the end would show one).
OBSERVER = """
window.__seen = {marker: null, answer: null, growth: {}};
new MutationObserver(() => {
  const now = performance.now();
  const seen = window.__seen;
  if (seen.marker === null && document.querySelector('.policy-marker')) seen.marker = now;
  const answer = document.querySelector('[data-role=answer]');
  if (seen.answer === null && answer && answer.textContent.length) seen.answer = now;
  for (const lane of document.querySelectorAll('.lane.proposer')) {
    const key = lane.closest('.run').dataset.model + '/' + lane.dataset.agent;
    const len = lane.querySelector('.lane-text').textContent.length;
    const g = seen.growth[key] || {len: 0, times: 0};
    if (len > g.len) { g.len = len; g.times += 1; }
    seen.growth[key] = g;
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def run_and_wait(driver: Any, runs: int = 1) -> list[Any]:
    driver.find_element(By.ID, "run").click()
    return finish(driver, runs)


def stat(panel: Any, key: str) -> str:
    return str(panel.find_element(By.CSS_SELECTOR, f'[data-stat="{key}"] dd').text)


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+\.\d+) s", text)
    assert match, text
    return float(match.group(1))


def screenshot(driver: Any, path: Path) -> None:
    """The whole page: the window is grown to the page's height first."""
    width = driver.get_window_size()["width"]
    for _ in range(3):  # the window's frame takes some height, and the layout may reflow
        missing = driver.execute_script(
            "return document.documentElement.scrollHeight - window.innerHeight"
        )
        if missing <= 0:
            break
        driver.set_window_size(width, driver.get_window_size()["height"] + missing)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def api_answer(url: str, model: str, headers: dict[str, str] | None = None) -> str:
    """The same prompt through the API, as any client would send it."""
    import asyncio

    async def ask() -> str:
        async with aiohttp.ClientSession() as session:
            payload = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
            async with session.post(
                url + "/v1/chat/completions", json=payload, headers=headers
            ) as resp:
                assert resp.status == 200
                return str((await resp.json())["choices"][0]["message"]["content"])

    return asyncio.run(ask())


def test_a_run_streams_every_lane_and_marks_the_policy_before_the_answer(
    driver: Any, server: Server, artifacts: Path
) -> None:
    open_page(driver, server.url)
    assert Select(driver.find_element(By.ID, "model-a")).first_selected_option.text == "moa-quorum"
    driver.execute_script(OBSERVER)
    (panel,) = run_and_wait(driver)

    by_agent = lanes(panel)
    assert list(by_agent) == ["swift", "steady", "slow", "flaky"], "one lane per proposer"
    for agent, lane in by_agent.items():
        assert lane.find_element(By.CSS_SELECTOR, ".lane-text").text.strip(), agent
    statuses = {agent: lane.get_attribute("data-status") for agent, lane in by_agent.items()}
    assert statuses == {
        "swift": "complete",
        "steady": "complete",
        "slow": "cancelled",
        "flaky": "failed",
    }
    seen = driver.execute_script("return window.__seen")
    # Text arrived while the proposers ran, not in one piece at the end.
    assert max(g["times"] for g in seen["growth"].values()) >= 3, seen["growth"]

    marker = panel.find_element(By.CSS_SELECTOR, ".policy-marker")
    assert marker.get_attribute("data-reason") == "quorum"
    assert "quorum" in marker.text and "Policy fired at" in marker.text
    assert seen["marker"] is not None and seen["answer"] is not None
    assert seen["marker"] < seen["answer"], "the policy fired before the answer's first token"

    answer = panel.find_element(By.CSS_SELECTOR, "[data-role=answer]").text
    assert answer.strip()
    ttft, total = seconds(stat(panel, "ttft")), seconds(stat(panel, "total"))
    assert 0 < ttft < total
    assert re.fullmatch(r"\d+", stat(panel, "answer-tokens"))
    assert re.fullmatch(r"≈? ?\d+ in · ≈? ?\d+ out", stat(panel, "tokens"))
    rows = panel.find_elements(By.CSS_SELECTOR, ".timeline .tl-row")
    assert len(rows) == 5, "four proposers and the aggregator on the timeline"
    assert panel.find_elements(By.CSS_SELECTOR, ".tl-line.policy")
    screenshot(driver, artifacts / "playground-run.png")


def test_the_answer_matches_the_api_answer(driver: Any, server: Server) -> None:
    """Same config (same simulator seed), same prompt: the page shows what the API answers."""
    open_page(driver, server.url)
    Select(driver.find_element(By.ID, "model-a")).select_by_value("moa-wait-all")
    (panel,) = run_and_wait(driver)
    # textContent, not .text: the exact characters, with no layout whitespace folding.
    shown = driver.execute_script(
        "return arguments[0].querySelector('[data-role=answer]').textContent", panel
    )
    assert shown == api_answer(server.url, "moa-wait-all")
    assert panel.find_element(By.CSS_SELECTOR, ".policy-marker").get_attribute("data-reason") == (
        "all"
    )


def test_compare_mode_states_two_different_ttfts(
    driver: Any, server: Server, artifacts: Path
) -> None:
    open_page(driver, server.url)
    driver.find_element(By.ID, "compare").click()
    second = driver.find_element(By.ID, "model-b")
    assert second.is_displayed()
    Select(second).select_by_value("moa-wait-all")
    panels = run_and_wait(driver, runs=2)
    assert [p.get_attribute("data-model") for p in panels] == ["moa-quorum", "moa-wait-all"]
    quorum, wait_all = (seconds(stat(p, "ttft")) for p in panels)
    # quorum(2) answers once two proposers are done (~1 s); wait_all after the slowest (~2.2 s).
    assert quorum < wait_all - 0.5, (quorum, wait_all)
    summary = driver.find_element(By.ID, "compare-summary")
    assert summary.is_displayed()
    stated = summary.find_element(By.CSS_SELECTOR, "[data-ttft-difference]")
    assert abs(float(stated.get_attribute("data-ttft-difference")) - (wait_all - quorum)) < 0.02
    sooner = r"moa-quorum gave its first token \d+\.\d\d s sooner than moa-wait-all"
    assert re.search(sooner, summary.text), summary.text
    screenshot(driver, artifacts / "playground-compare.png")


def test_keyboard_alone_runs_a_prompt(driver: Any, server: Server) -> None:
    open_page(driver, server.url)
    # Nothing has focus after loading: Tab walks the page from its start.
    order = []
    for _ in range(5):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        focused = driver.switch_to.active_element
        order.append(focused.get_attribute("id") or focused.get_attribute("class"))
    assert order == ["skip", "model-a", "compare", "prompt", "run"]
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    finish(driver, 1)


def test_the_page_fits_a_phone(driver: Any, server: Server, artifacts: Path) -> None:
    driver.set_window_size(390, 844)
    try:
        open_page(driver, server.url)
        run_and_wait(driver)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
        screenshot(driver, artifacts / "playground-phone.png")
    finally:
        driver.set_window_size(1400, 1000)


def test_a_javascript_error_is_caught_by_the_check(driver: Any, server: Server) -> None:
    """The check every test ends with does see an uncaught error (and a console.error)."""
    open_page(driver, server.url)
    driver.execute_script("setTimeout(() => { throw new Error('deliberate failure'); })")
    driver.execute_script("console.error('deliberate console error')")
    errors = wait_for(lambda: page_errors(driver), timeout=5, what="the errors to be logged")
    assert any("deliberate failure" in e for e in errors), errors


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("ui") / "keyed.toml"
    config.write_text(
        Path(__file__).with_name("playground.toml").read_text()
        + "\n[server]\napi_keys_env = 'MOA_UI_TEST_KEYS'\n"
    )
    with serve(config, env={"MOA_UI_TEST_KEYS": KEY}) as running:
        yield running


def test_the_page_asks_for_a_key_when_the_server_has_keys(
    chromium: tuple[str, str], keyed_server: Server
) -> None:
    with tempfile.TemporaryDirectory(prefix="moa-ui-") as profile:
        driver = start_browser(chromium, profile)
        try:
            driver.get(keyed_server.url + "/")
            form = driver.find_element(By.ID, "key-form")
            wait_for(form.is_displayed, what="the key form")
            assert not driver.find_element(By.ID, "run").is_enabled()
            key = driver.find_element(By.ID, "api-key")
            assert driver.switch_to.active_element == key
            key.send_keys("sk-wrong", Keys.ENTER)
            error = driver.find_element(By.ID, "key-error")
            wait_for(lambda: "refused" in error.text, what="the refusal")
            key.clear()
            key.send_keys(KEY, Keys.ENTER)
            wait_for(lambda: not form.is_displayed(), what="the key to be accepted")
            wait_for(driver.find_element(By.ID, "run").is_enabled, what="the models")
            (panel,) = run_and_wait(driver)
            shown = panel.find_element(By.CSS_SELECTOR, "[data-role=answer]").text
            assert shown.strip()
            assert not page_errors(driver)
        finally:
            driver.quit()


def test_the_embedded_default_config_needs_no_key(driver: Any) -> None:
    """What ``make serve`` starts: simulated agents, no key; the page runs its first MoA."""
    with serve(None) as default:
        open_page(driver, default.url)
        assert not driver.find_element(By.ID, "key-form").is_displayed()
        (panel,) = run_and_wait(driver)
        assert len(lanes(panel)) == 4
        for agent, lane in lanes(panel).items():
            assert lane.get_attribute("data-status") in ("complete", "partial", "cancelled"), agent
        assert panel.find_element(By.CSS_SELECTOR, "[data-role=answer]").text.strip()
        assert panel.find_elements(By.CSS_SELECTOR, ".policy-marker")
