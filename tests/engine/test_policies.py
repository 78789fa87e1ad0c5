"""Policies are pure: their decisions are replayed here from generated event sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moa_stream import ConfigError
from moa_stream.engine import (
    AllOf,
    AnyOf,
    Deadline,
    LayerState,
    Partial,
    Quorum,
    UsableAnswer,
    WaitAll,
    parse_policy,
)
from moa_stream.engine.policies import Policy

# The policies' properties are about counts: any finished answer counts as complete here.
ANY_ANSWER = UsableAnswer(min_chars=0, finish_reasons=None)


@dataclass
class Status:
    n: int
    done: int = 0
    failed: int = 0
    elapsed: float = 0.0
    tokens: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = self.tokens or [0] * self.n
        self.finished = self.finished or [False] * self.n


# An event: (proposer index, kind, time). Times are made increasing by sorting.
events_strategy = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.tuples(
                st.integers(0, n - 1),
                st.sampled_from(["delta", "delta", "done", "failed"]),
                st.floats(0, 10, allow_nan=False),
            ),
            max_size=40,
        ),
    )
)


def replay(n: int, events: list[tuple[int, str, float]], policy: Policy) -> tuple[LayerState, list]:
    """Feed events in time order; return the state and the history of (event, decision)."""
    state = LayerState([f"a{i}" for i in range(n)], policy, started_at=0.0, usable=ANY_ANSWER)
    history = []
    for index, kind, t in sorted(events, key=lambda e: e[2]):
        before = state.decision
        if kind == "delta":
            state.on_delta(index, "x", t)
        elif kind == "done":
            state.on_done(index, t)
        else:
            state.on_failed(index, "boom", t)
        d = state.decide()
        history.append(((index, kind, t), before, d, state.done, state.failed))
    return state, history


@given(events_strategy, st.integers(1, 6))
def test_quorum_fires_exactly_when_kth_completion_arrives(case, k) -> None:
    n, events = case
    _state, history = replay(n, events, Quorum(k))
    fired = [h for h in history if h[1] is None and h[2] is not None]
    assert len(fired) <= 1, "a layer decides once"
    for (_index, kind, _t), before, decision, done, failed in history:
        if before is not None:
            break
        if decision is None:
            # not fired: fewer than k done, and still reachable with something running
            assert done < k or ((n - done - failed) == 0 and done < min(k, n))
            continue
        if decision.reason == "quorum":
            assert kind == "done" and done == k, "fires on the k-th completion, not before"
        elif decision.reason == "all":
            assert n - done - failed == 0 and done >= min(k, n)
        else:
            assert decision.reason == "degraded"
            assert done + (n - done - failed) < min(k, n) or n - done - failed == 0
        assert sum(r.status == "complete" for r in decision.references) == done


@given(events_strategy)
def test_wait_all_fires_only_when_nothing_is_running(case) -> None:
    n, events = case
    state, _ = replay(n, events, WaitAll())
    if state.decision is not None:
        # with no answer to go on, the layer is degraded whatever fired
        assert state.decision.reason == ("all" if state.done else "degraded")
        assert state.done + state.failed == n
    else:
        assert state.done + state.failed < n


@given(
    events_strategy,
    st.floats(0.1, 5, allow_nan=False),
    st.integers(0, 4),
    st.booleans(),
    st.floats(0, 12, allow_nan=False),
)
def test_deadline_fires_at_its_time_with_at_least_min_k(
    case, seconds, min_k, partial, tick
) -> None:
    n, events = case
    policy = Deadline(seconds, min_k=min_k, partial=partial)
    state = LayerState([f"a{i}" for i in range(n)], policy, started_at=0.0, usable=ANY_ANSWER)
    timeline = sorted([*events, (-1, "tick", tick)], key=lambda e: e[2])
    for index, kind, t in timeline:
        if state.decision is not None:
            break
        if kind == "delta":
            state.on_delta(index, "x", t)
        elif kind == "done":
            state.on_done(index, t)
        elif kind == "failed":
            state.on_failed(index, "boom", t)
        else:
            state.on_tick(t)
        d = state.decide()
        if d is None:
            continue
        if d.reason == "deadline":
            assert d.at >= seconds, "never before its time"
            assert d.usable >= min_k
            if not partial:
                assert all(r.status != "partial" for r in d.references)
        elif d.reason == "all":
            assert state.running == 0
        else:
            assert d.reason == "degraded"
    if state.decision is None and state.now >= seconds:
        # past the deadline without firing: not enough references yet
        available = state.done + (
            sum(1 for t, f in zip(state.tokens, state.finished, strict=True) if t > 0 and not f)
            if partial
            else 0
        )
        assert available < min_k


def test_deadline_asks_for_a_timer_until_its_time() -> None:
    policy = Deadline(2.0, min_k=1)
    assert policy.next_check(Status(3, elapsed=0.5)) == 2.0
    assert policy.next_check(Status(3, elapsed=2.5)) is None
    assert policy.check(Status(3, elapsed=2.5)) is None, "min_k not met yet"
    assert policy.check(Status(3, done=1, elapsed=2.5, finished=[True, False, False])) is not None


@given(events_strategy, st.integers(1, 6), st.integers(1, 5))
def test_partial_fires_when_k_proposers_have_enough_tokens(case, k, min_tokens) -> None:
    n, events = case
    state, history = replay(n, events, Partial(k, min_tokens=min_tokens))
    for _event, before, decision, _done, _failed in history:
        if before is None and decision is not None:
            ready = sum(1 for c in state.calls if c.status == "complete" or c.chunks >= min_tokens)
            if decision.reason in ("partial", "quorum"):
                assert ready >= k
            if decision.reason == "partial":
                # every running proposer's text goes in, but k of the references are long enough
                assert any(r.status == "partial" for r in decision.references)
                long_enough = [
                    r
                    for r in decision.references
                    if r.status == "complete"
                    or (r.status == "partial" and len(r.text) >= min_tokens)
                ]
                assert len(long_enough) >= k


def test_any_of_fires_on_first_and_all_of_needs_both() -> None:
    s = Status(4, done=1, elapsed=3.0, finished=[True, False, False, False])
    assert AnyOf((Quorum(2), Deadline(2.0))).check(s) is not None
    assert AllOf((Quorum(2), Deadline(2.0))).check(s) is None
    s2 = Status(4, done=2, elapsed=3.0, finished=[True, True, False, False])
    fire = AllOf((Quorum(2), Deadline(2.0))).check(s2)
    assert fire is not None and fire.reason == "deadline"


def test_combinators_compose_with_operators() -> None:
    p = Quorum(3) | Deadline(2.0)
    assert isinstance(p, AnyOf)
    q = Quorum(3) & Deadline(1.0) | WaitAll()
    assert isinstance(q, AnyOf) and isinstance(q.policies[0], AllOf)


@pytest.mark.parametrize(
    "text",
    [
        "wait_all",
        "quorum(3)",
        "deadline(2.0)",
        "deadline(1.5, min_k=2, partial=true)",
        "partial(2, min_tokens=48)",
        "quorum(3) | deadline(2.0)",
        "(quorum(2) & deadline(1.0)) | wait_all",
    ],
)
def test_policy_language_round_trips(text: str) -> None:
    policy = parse_policy(text)
    assert parse_policy(repr(policy)) == policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quorum()", "missing argument k"),
        ("quorum(0)", "k >= 1"),
        ("quorum(2.5)", "whole number"),
        ("sometimes(1)", "unknown policy"),
        ("quorum(2) |", "expected 'name'"),
        ("deadline(1, bogus=2)", "unknown argument bogus"),
        ("quorum(2) $", "unexpected character"),
    ],
)
def test_policy_language_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy(text)
