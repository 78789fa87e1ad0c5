"""A staircase run on the page: one run, one set of figures.

The answer's header and the tiles give the same token count (every step's) and the same first
token; proposers a later step read are used, not "not waited for" or "not used"; lanes still
streaming show counts that move; and the answer's smoothness (its longest gap between chunks,
and its restarts) is computed from what the page received.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[ui]'")

from selenium.webdriver.common.by import By
from support.playground_page import finish, lanes, open_page
from support.ui import Server, serve

pytestmark = pytest.mark.ui

CONFIG = Path(__file__).with_name("staircase.toml")

# Records every "tokens so far" a lane showed while it ran, with its text's length then.
OBSERVER = """
window.__counts = {};
new MutationObserver(() => {
  for (const lane of document.querySelectorAll('.lane.proposer')) {
    const m = /≈ (\\d+) tokens? so far/.exec(lane.querySelector('.lane-meta').textContent);
    if (!m) continue;
    const seen = (window.__counts[lane.dataset.agent] ||= []);
    const n = Number(m[1]);
    const chars = lane.querySelector('.lane-text').textContent.length;
    const last = seen[seen.length - 1];
    if (!last || last[0] !== n || last[1] !== chars) seen.push([n, chars]);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def stairs_server() -> Iterator[Server]:
    with serve(CONFIG) as running:
        yield running


def stat(panel: Any, key: str) -> str:
    return str(panel.find_element(By.CSS_SELECTOR, f'[data-stat="{key}"] dd').text)


def test_a_staircase_run_shows_one_set_of_figures(driver: Any, stairs_server: Server) -> None:
    open_page(driver, stairs_server.url)
    driver.execute_script(OBSERVER)
    driver.find_element(By.ID, "run").click()
    (panel,) = finish(driver, 1)

    # One token count: the header's is the tile's, and counts every step.
    header = panel.find_element(By.CSS_SELECTOR, ".lane.answer .lane-meta").text
    match = re.fullmatch(r"(≈ )?(\d+) tokens? · first token at (\d+\.\d+) s", header)
    assert match, header
    assert stat(panel, "answer-tokens") == f"{match.group(1) or ''}{match.group(2)}"
    steps = panel.find_elements(By.CSS_SELECTOR, "[data-role=answer] .mark.step")
    assert len(steps) >= 2, "the staircase asked more than one step"
    # One first token: the header's is the browser's TTFT tile.
    assert stat(panel, "ttft") == f"{match.group(3)} s"

    # The slow proposers were read by later steps: used, and the policy note says they ran on.
    by_agent = lanes(panel)
    for agent in ("steady-1", "steady-2"):
        lane = by_agent[agent]
        assert lane.get_attribute("data-used") == "yes", agent
        assert "not used" not in lane.find_element(By.CSS_SELECTOR, ".badge").text
    note = panel.find_element(By.CSS_SELECTOR, ".policy-marker").text
    assert "not waited for" not in note, note
    assert "still running, read by later steps" in note, note

    # Live counts moved with the text of lanes the staircase read on.
    counts = driver.execute_script("return window.__counts")
    for agent in ("steady-1", "steady-2"):
        seen = counts.get(agent, [])
        assert len({n for n, _ in seen}) >= 3, (agent, seen)
        assert all(n > 0 for n, chars in seen if chars > 40), (agent, seen)

    # The answer's smoothness, from what the page received.
    gap = stat(panel, "longest-gap")
    assert re.fullmatch(r"\d+\.\d\d s", gap), gap
    assert re.fullmatch(r"\d+", stat(panel, "restarts"))
    assert re.fullmatch(r"\d+", stat(panel, "loops"))


def test_restarts_are_sentences_that_open_like_an_earlier_one(
    driver: Any, stairs_server: Server
) -> None:
    open_page(driver, stairs_server.url)
    cases = {
        "": 0,
        "The sky is blue. Light scatters off air.": 0,
        "The sky is blue today. Light scatters. The sky is blue, today because of air.": 1,
        # Case and punctuation do not matter; a short sentence cannot restart anything.
        "Rayleigh scattering explains it! rayleigh, Scattering: EXPLAINS it all? Yes. Yes.": 1,
        "One two three four. One two three five. One two three four again. One two three four.": 2,
    }
    script = """
const done = arguments[arguments.length - 1];
import('/playground/app.js').then((m) => done([
  ...arguments[0].map((t) => m.countRestarts(t)),
  m.longestGap([0.1, 0.15, 0.9, 1.0]),
  m.longestGap([0.5]),
  ...arguments[1].map((t) => m.countLoops(t)),
]));
"""
    item = "tip is to stay away from the temptation of a glass of water before bed."
    loops = {
        f"The fifth {item} The sixth {item} The seventh {item}": 2,
        # Items that share a few words are a list, not a loop.
        "The first tip is to drink water. The second tip is to walk every day.": 0,
        "": 0,
    }
    got = driver.execute_async_script(script, list(cases), list(loops))
    assert got[len(cases) + 2 :] == list(loops.values())
    got = got[: len(cases) + 2]
    assert got[: len(cases)] == list(cases.values())
    assert got[-2] == pytest.approx(0.75)
    assert got[-1] is None
