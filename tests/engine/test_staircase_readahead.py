"""The staircase's read-ahead on its own: what the caller gets of it and when, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from moa_stream.engine._staircase_readahead import COVER_GAP, MAX_COVER, ReadAhead
from moa_stream.engine._staircase_steps import OpenStep, Pacer
from moa_stream.engine.staircase import Staircase


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def read_ahead(
    *, limit: int = 32, max_pause: float = 1.0, stepping: bool = True
) -> tuple[ReadAhead, Clock, list[str], list[tuple[Any, str, float]]]:
    clock = Clock()
    answer: list[str] = []
    deltas: list[tuple[Any, str, float]] = []
    ahead = ReadAhead(
        answer,
        lambda record, text, now: deltas.append((record, text, now)),
        Pacer(None, list),
        SimpleNamespace(stepping=stepping),  # type: ignore[arg-type]
        Staircase(read_ahead=limit, max_pause=max_pause),
        clock=clock,
        t0=90.0,
    )
    return ahead, clock, answer, deltas


def step(budget: int = 8, written: int = 0, final: bool = False) -> OpenStep:
    return OpenStep(0, None, "r0", None, budget, final, written)  # type: ignore[arg-type]


def test_before_the_first_chunk_everything_read_ahead_goes_at_once() -> None:
    ahead, clock, answer, deltas = read_ahead()
    ahead.step = step()
    ahead.push(" The", 1, "r0")
    ahead.push(" sky is", 2, "r0")
    assert (ahead.chunks, ahead.written(), ahead.text()) == (3, 3, " The sky is")
    assert ahead.last_char() == "s" and ahead.answer_text() == " The sky is"
    clock.now = 101.0
    out = ahead.release()
    # no spacing before the caller's first chunk: nothing yet to space from
    assert [(d.text, d.t) for d in out] == [(" The", 11.0)]
    assert answer == [" The"] and deltas == [("r0", " The", 101.0)]
    assert ahead.first_token_at == ahead.last_at == 101.0
    assert ahead.given == 1 and ahead.chunks == 2 and ahead.written() == 3


def test_the_caller_gets_the_read_ahead_spaced_out_while_a_step_may_follow() -> None:
    ahead, clock, answer, _ = read_ahead()
    ahead.step = step(budget=4)
    clock.now = 100.4  # the first chunk 0.4 s after the request: the ready time to plan for
    ahead.push(" a", 1, "r0")
    ahead.release()
    assert ahead.step_ready == pytest.approx(0.4) and ahead.ready_dev == pytest.approx(0.2)
    assert ahead.ready_bound() == pytest.approx(0.8)
    for word in (" b", " c", " d"):
        ahead.push(word, 1, "r0")
    # 3 chunks ready and 4 left of the budget, over 0.8 s (nothing read yet: no gap)
    assert ahead.spacing() == pytest.approx(0.8 / 7)
    assert ahead.turn(clock.now) == pytest.approx(100.4 + 0.8 / 7)
    assert ahead.release() == []
    clock.now += 0.8 / 7
    assert [d.text for d in ahead.release()] == [" b"]
    assert answer == [" a", " b"]


def test_no_spacing_once_no_step_will_follow_or_without_a_read_ahead() -> None:
    for kwargs, current in (
        ({"stepping": False}, step()),
        ({"limit": 0}, step()),
        ({}, step(final=True)),
        ({}, None),
    ):
        ahead = read_ahead(**kwargs)[0]
        ahead.step = current
        ahead.push(" a", 1, "r0")
        ahead.release()
        ahead.step_took(0.5)
        ahead.push(" b", 1, "r0")
        assert ahead.spacing() == 0.0
        assert [d.text for d in ahead.release()] == [" b"]


def test_spacing_is_at_most_half_the_pause() -> None:
    ahead = read_ahead(max_pause=0.2)[0]
    ahead.step = step(budget=1)
    ahead.push(" a", 1, "r0")
    ahead.release()
    ahead.step_took(5.0)  # bounded by twice the pause
    assert ahead.step_ready == pytest.approx(0.2)
    ahead.push(" b", 1, "r0")
    assert ahead.spacing() == pytest.approx(0.1)


def test_the_moving_averages() -> None:
    ahead, clock, _, _ = read_ahead(max_pause=1.0)
    ahead.step_took(0.4)
    assert (ahead.step_ready, ahead.ready_dev) == (pytest.approx(0.2), pytest.approx(0.2))
    ahead.chunk_read()
    clock.now += 0.1
    ahead.chunk_read()
    assert ahead.read_gap == pytest.approx(0.02)
    clock.now += 10.0  # a stall counts as the pause at most
    ahead.chunk_read()
    assert ahead.read_gap == pytest.approx(0.02 + (1.0 - 0.02) * 0.2)


def test_a_boundary_needs_read_ahead_for_a_chunk_every_cover_gap() -> None:
    ahead, _, _, _ = read_ahead(limit=32)
    assert ahead.cover() == 0  # nothing to wait for yet
    ahead.step_ready, ahead.ready_dev = 0.3, 0.1  # plan for 0.5 s
    assert ahead.cover() == round(0.5 / COVER_GAP) - 1
    ahead.step_ready = 10.0
    assert ahead.cover() == MAX_COVER
    small, _, _, _ = read_ahead(limit=2)
    small.step_ready = 10.0
    assert small.cover() == 2
    assert read_ahead(limit=0)[0].cover() == 0


def test_flush_gives_everything_at_once_and_the_answer_text_follows() -> None:
    ahead, clock, answer, deltas = read_ahead()
    ahead.step = step(budget=2)
    ahead.push("One", 1, "r0")
    ahead.release()
    ahead.step_took(1.0)
    ahead.push(" two", 1, "r0")
    ahead.push(" three.", 2, "r1")
    assert ahead.release() == []  # not their turn yet
    assert ahead.tail() == ahead.answer_text() == "One two three."
    assert ahead.answer_chars() == len("One two three.")
    assert [d.text for d in ahead.flush()] == [" two", " three."]
    assert answer == ["One", " two", " three."] and not ahead.pieces
    assert [r for r, _, _ in deltas] == ["r0", "r0", "r1"]
    assert ahead.given == 4 and ahead.written() == 4 and ahead.last_char() == "."
    assert ahead.pause_end() == clock.now + 1.0
