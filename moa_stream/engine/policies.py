"""Layer policies: small, pure objects that decide when a layer stops waiting.

A policy looks at a :class:`LayerStatus` (counts, per-proposer token counts, elapsed time) and
answers three questions:

- :meth:`Policy.check`: should the layer move on now? Returns a :class:`Fire` or ``None``.
- :meth:`Policy.unreachable`: can it never fire any more (too many failures)?
- :meth:`Policy.next_check`: at what elapsed time must it be asked again even if nothing
  happens (a deadline)? The runner arms one timer for that.

They hold no state and do no I/O, so every decision can be replayed from a sequence of events
(see ``tests/engine/test_policies.py``). Combine them with ``|`` (whichever fires first) and
``&`` (only when both hold)::

    Quorum(3) | Deadline(2.0)
    Partial(k=2, min_tokens=48) | Deadline(1.5, min_k=1, partial=True)

Every policy also fires with reason ``all`` once no proposer is running: there is nothing left
to wait for.

Invalid arguments raise :class:`moa_stream.ConfigError`, as every other invalid setting does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol, runtime_checkable

from moa_stream._exceptions import ConfigError
from moa_stream.engine.events import LayerEndReason

__all__ = [
    "AllOf",
    "AnyOf",
    "Deadline",
    "Fire",
    "LayerStatus",
    "Partial",
    "Policy",
    "Quorum",
    "WaitAll",
    "parse_policy",
    "relax",
    "required_completions",
]


class LayerStatus(Protocol):
    """What a policy may look at. ``tokens[i]`` counts proposer i's usable content chunks so
    far (0 once it failed); ``finished[i]`` is true once it completed (not failed)."""

    @property
    def n(self) -> int: ...
    @property
    def done(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def tokens(self) -> Sequence[int]: ...
    @property
    def finished(self) -> Sequence[bool]: ...


@dataclass(frozen=True, slots=True)
class Fire:
    """A policy's decision to move on. ``partial``: running proposers' text so far goes in."""

    reason: LayerEndReason
    partial: bool = False


_ALL = Fire("all")


def _running(s: LayerStatus) -> int:
    return s.n - s.done - s.failed


def _all_finished(s: LayerStatus, k: int) -> Fire | None:
    """Nothing is running: fire ``all`` if ``k`` completed (or every proposer, if fewer)."""
    return _ALL if s.done >= min(k, s.n) else None


def _out_of_reach(s: LayerStatus, k: int) -> bool:
    """Too many failed for ``k`` (or all of them, if fewer) to complete."""
    return s.done + _running(s) < min(k, s.n)


@runtime_checkable
class Policy(Protocol):
    def check(self, status: LayerStatus) -> Fire | None: ...
    def unreachable(self, status: LayerStatus) -> bool: ...
    def next_check(self, status: LayerStatus) -> float | None: ...
    def __or__(self, other: Policy) -> Policy: ...
    def __and__(self, other: Policy) -> Policy: ...


class _Combinable:
    __slots__ = ()

    def next_check(self, status: LayerStatus) -> float | None:
        """No timer needed: only events can make this policy fire."""
        return None

    def __or__(self, other: Policy) -> Policy:
        return AnyOf((self, other))  # type: ignore[arg-type]

    def __and__(self, other: Policy) -> Policy:
        return AllOf((self, other))  # type: ignore[arg-type]


class _Counting(_Combinable):
    """A policy that waits for a number of proposers, the value of its field ``_count_field``.
    Once none is running it fires ``all`` if that many completed (or every proposer, if fewer);
    it is out of reach once too many failed for that. While proposers run,
    :meth:`_check_running` decides."""

    __slots__ = ()

    _count_field: ClassVar[str] = "k"

    @property
    def _needed(self) -> int:
        needed: int = getattr(self, self._count_field)
        return needed

    def _check_running(self, status: LayerStatus) -> Fire | None:
        raise NotImplementedError

    def check(self, status: LayerStatus) -> Fire | None:
        if _running(status) == 0:
            return _all_finished(status, self._needed)
        return self._check_running(status)

    def unreachable(self, status: LayerStatus) -> bool:
        return _out_of_reach(status, self._needed)


@dataclass(frozen=True, slots=True, repr=False)
class WaitAll(_Combinable):
    """Wait for every proposer to finish or fail: the original MoA behaviour."""

    def check(self, status: LayerStatus) -> Fire | None:
        return _ALL if _running(status) == 0 else None

    def unreachable(self, status: LayerStatus) -> bool:
        return False

    def __repr__(self) -> str:
        return "wait_all"


@dataclass(frozen=True, slots=True, repr=False)
class Quorum(_Counting):
    """Move on as soon as ``k`` proposers have completed; the others are stragglers."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError("Quorum(k) needs k >= 1")

    def _check_running(self, status: LayerStatus) -> Fire | None:
        return Fire("quorum") if status.done >= self.k else None

    def __repr__(self) -> str:
        return f"quorum({self.k})"


@dataclass(frozen=True, slots=True, repr=False)
class Deadline(_Counting):
    """Move on ``seconds`` after the layer started, once at least ``min_k`` references exist.

    With ``partial=False`` only completed answers count toward ``min_k`` and go forward; with
    ``partial=True`` a running proposer that has produced any text counts too, and its text so
    far goes in marked partial. If ``min_k`` isn't met at the deadline, the policy fires the
    moment it is.
    """

    seconds: float
    min_k: int = 1
    partial: bool = False

    _count_field = "min_k"

    def __post_init__(self) -> None:
        if not self.seconds >= 0 or math.isinf(self.seconds):
            raise ConfigError("Deadline(seconds) needs a finite, non-negative number")
        if self.min_k < 0:
            raise ConfigError("Deadline(min_k) needs min_k >= 0")

    def _available(self, status: LayerStatus) -> int:
        if not self.partial:
            return status.done
        return sum(1 for t, f in zip(status.tokens, status.finished, strict=True) if f or t > 0)

    def _check_running(self, status: LayerStatus) -> Fire | None:
        if status.elapsed >= self.seconds and self._available(status) >= self.min_k:
            return Fire("deadline", partial=self.partial)
        return None

    def next_check(self, status: LayerStatus) -> float | None:
        return self.seconds if status.elapsed < self.seconds else None

    def __repr__(self) -> str:
        args = [repr(self.seconds)]
        if self.min_k != 1:
            args.append(f"min_k={self.min_k}")
        if self.partial:
            args.append("partial=true")
        return f"deadline({', '.join(args)})"


@dataclass(frozen=True, slots=True, repr=False)
class Partial(_Counting):
    """Staircase start: move on once ``k`` proposers have each produced ``min_tokens`` content
    tokens (or completed). Running proposers' text so far goes in, marked partial."""

    k: int
    min_tokens: int = 32

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError("Partial(k) needs k >= 1")
        if self.min_tokens < 1:
            raise ConfigError("Partial(min_tokens) needs min_tokens >= 1")

    def _check_running(self, status: LayerStatus) -> Fire | None:
        ready = 0
        complete = 0
        m = self.min_tokens
        for t, f in zip(status.tokens, status.finished, strict=True):
            if f:
                complete += 1
                ready += 1
            elif t >= m:
                ready += 1
        if ready >= self.k:
            return Fire("quorum") if complete >= self.k else Fire("partial", partial=True)
        return None

    def __repr__(self) -> str:
        return f"partial({self.k}, min_tokens={self.min_tokens})"


@dataclass(frozen=True, slots=True, repr=False)
class _Combination(_Combinable):
    """Policies joined by one operator, ``|`` or ``&``; it is asked again when the first of
    them needs to be."""

    policies: tuple[Policy, ...]
    _operator: ClassVar[str]

    def next_check(self, status: LayerStatus) -> float | None:
        times = [t for p in self.policies if (t := p.next_check(status)) is not None]
        return min(times) if times else None

    def __repr__(self) -> str:
        return f" {self._operator} ".join(_paren(p) for p in self.policies)


@dataclass(frozen=True, slots=True, repr=False)
class AnyOf(_Combination):
    """Fires when any of its policies fires (the first one listed wins a tie)."""

    _operator = "|"

    def check(self, status: LayerStatus) -> Fire | None:
        for p in self.policies:
            fire = p.check(status)
            if fire is not None:
                return fire
        return None

    def unreachable(self, status: LayerStatus) -> bool:
        return all(p.unreachable(status) for p in self.policies)

    def __or__(self, other: Policy) -> Policy:
        return AnyOf((*self.policies, other))


@dataclass(frozen=True, slots=True, repr=False)
class AllOf(_Combination):
    """Fires only when every one of its policies would fire. The result does not depend on the
    order of the operands: partial text goes in if any operand takes it, and the reason is the
    most specific one among the operands' (``deadline``, then ``partial``, ``quorum``,
    ``all``)."""

    _operator = "&"

    def check(self, status: LayerStatus) -> Fire | None:
        reason: LayerEndReason = "all"
        partial = False
        for p in self.policies:
            fire = p.check(status)
            if fire is None:
                return None
            partial = partial or fire.partial
            if _RANK[fire.reason] > _RANK[reason]:
                reason = fire.reason
        return Fire(reason, partial)

    def unreachable(self, status: LayerStatus) -> bool:
        return any(p.unreachable(status) for p in self.policies)

    def __and__(self, other: Policy) -> Policy:
        return AllOf((*self.policies, other))


_RANK: dict[LayerEndReason, int] = {
    "all": 0,
    "quorum": 1,
    "partial": 2,
    "deadline": 3,
    "degraded": 4,
}


def relax(policy: Policy, reachable: int) -> Policy:
    """``policy`` with every ``k`` (and ``min_k``) lowered to ``reachable``: the best rule that
    can still be met once too many proposers failed. Policies it does not know are returned
    as they are."""
    k = max(1, reachable)
    if isinstance(policy, Quorum | Partial):
        return replace(policy, k=min(policy.k, k))
    if isinstance(policy, Deadline):
        return replace(policy, min_k=min(policy.min_k, k))
    if isinstance(policy, _Combination):
        return type(policy)(tuple(relax(p, reachable) for p in policy.policies))
    return policy


def required_completions(policy: Policy) -> int:
    """The largest number of proposers any part of ``policy`` asks for (0 for ``wait_all``).

    A layer with fewer proposers than that could never meet it as written."""
    if isinstance(policy, _Counting):
        return policy._needed
    if isinstance(policy, _Combination):
        return max((required_completions(p) for p in policy.policies), default=0)
    return 0


def _paren(p: Policy) -> str:
    text = repr(p)
    return f"({text})" if isinstance(p, _Combination) else text


# ---------------------------------------------------------------------------------------------
# Parsing the policy language used in TOML configs and on the command line. It is the same text
# ``repr`` prints: ``quorum(3) | deadline(2.0, min_k=2)``; ``&`` binds tighter than ``|``.

Token = tuple[Literal["name", "num", "bool", "op", "eof"], str]


def _tokenize(text: str, notes: list[str] | None = None) -> list[Token]:
    """The tokens of ``text``; a slip the parser can read past (a unit after a number) is
    added to ``notes`` instead of ending the parse."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "|&(),=":
            tokens.append(("op", c))
            i += 1
        elif c.isdigit() or c == ".":
            j = i
            while j < len(text) and (text[j].isdigit() or text[j] in ".eE_"):
                j += 1
            tokens.append(("num", text[i:j]))
            if j < len(text) and text[j].isalpha():
                # "2s", "500ms": a unit is the usual slip, and the parser's error at the
                # letters ("expected '='") would not say so. Skipped here and reported with
                # whatever else is wrong, so one message names every mistake.
                k = j
                while k < len(text) and text[k].isalnum():
                    k += 1
                if notes is not None:
                    notes.append(
                        f"durations are plain seconds: write {text[i:j]}, not {text[i:k]!r}"
                    )
                j = k
            i = j
        elif c.isalpha() or c == "_":
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            kind: Literal["name", "bool"] = "bool" if word in ("true", "false") else "name"
            tokens.append((kind, word))
            i = j
        elif c == "-":
            raise ConfigError(
                f"unexpected '-' at position {i}: durations are non-negative seconds and "
                "counts whole numbers >= 0"
            )
        else:
            raise ConfigError(f"unexpected character {c!r} at position {i}")
    tokens.append(("eof", ""))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        #: mistakes read past, reported together with the first real error (or alone)
        self.notes: list[str] = []
        self.tokens = _tokenize(text, self.notes)
        self.pos = 0

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self, kind: str, value: str | None = None) -> str:
        tk, tv = self.tokens[self.pos]
        if tk != kind or (value is not None and tv != value):
            want = value or kind
            raise ConfigError(f"expected {want!r}, found {tv or 'end of text'!r}")
        self.pos += 1
        return tv

    def parse(self) -> Policy:
        policy = self.any_of()
        kind, value = self.peek()
        if kind != "eof":
            # Two policies side by side: say how they combine rather than "expected 'eof'".
            word = f" (not {value!r})" if value.lower() in ("or", "and") else ""
            raise ConfigError(
                f"unexpected {value!r} after a policy: combine policies with '|' (whichever "
                f"fires first) or '&' (once both hold){word}"
            )
        return policy

    def any_of(self) -> Policy:
        return self.joined("|", self.all_of, AnyOf)

    def all_of(self) -> Policy:
        return self.joined("&", self.atom, AllOf)

    def joined(
        self,
        op: str,
        part: Callable[[], Policy],
        combine: Callable[[tuple[Policy, ...]], Policy],
    ) -> Policy:
        """One or more of ``part`` separated by ``op``, combined when there are several."""
        parts = [part()]
        while self.peek() == ("op", op):
            self.pos += 1
            parts.append(part())
        return parts[0] if len(parts) == 1 else combine(tuple(parts))

    def atom(self) -> Policy:
        if self.peek() == ("op", "("):
            self.pos += 1
            inner = self.any_of()
            self.take("op", ")")
            return inner
        name = self.take("name")
        args: list[float | bool] = []
        kwargs: dict[str, float | bool] = {}
        if self.peek() == ("op", "("):
            self.pos += 1
            while self.peek() != ("op", ")"):
                if self.peek()[0] == "name":
                    key = self.take("name")
                    self.take("op", "=")
                    kwargs[key] = self.value()
                else:
                    if kwargs:
                        raise ConfigError("positional argument after keyword argument")
                    args.append(self.value())
                if self.peek() == ("op", ","):
                    self.pos += 1
            self.take("op", ")")
        return _build(name, args, kwargs)

    def value(self) -> float | bool:
        kind, text = self.peek()
        self.pos += 1
        if kind == "bool":
            return text == "true"
        if kind == "num":
            return float(text)
        raise ConfigError(f"expected a number or true/false, found {text or 'end of text'!r}")


def _int(v: float | bool, what: str) -> int:
    if isinstance(v, bool) or v != int(v):
        raise ConfigError(f"{what} must be a whole number")
    return int(v)


def _build(name: str, args: list[float | bool], kwargs: dict[str, float | bool]) -> Policy:
    def arg(i: int, key: str, default: float | bool | None = None) -> float | bool:
        if i < len(args):
            if key in kwargs:
                raise ConfigError(f"{name}: {key} given twice")
            return args[i]
        if key in kwargs:
            return kwargs[key]
        if default is None:
            raise ConfigError(f"{name}: missing argument {key}")
        return default

    def check_keys(allowed: set[str], max_args: int) -> None:
        unknown = set(kwargs) - allowed
        if unknown:
            raise ConfigError(f"{name}: unknown argument {sorted(unknown)[0]}")
        if len(args) > max_args:
            raise ConfigError(f"{name}: too many arguments")

    if name in ("wait_all", "all"):
        check_keys(set(), 0)
        return WaitAll()
    if name == "quorum":
        check_keys({"k"}, 1)
        return Quorum(_int(arg(0, "k"), "quorum k"))
    if name == "deadline":
        check_keys({"seconds", "min_k", "partial"}, 3)
        seconds = arg(0, "seconds")
        if isinstance(seconds, bool):
            raise ConfigError("deadline seconds must be a number")
        return Deadline(
            float(seconds),
            _int(arg(1, "min_k", 1), "deadline min_k"),
            bool(arg(2, "partial", False)),
        )
    if name == "partial":
        check_keys({"k", "min_tokens"}, 2)
        return Partial(
            _int(arg(0, "k"), "partial k"), _int(arg(1, "min_tokens", 32), "partial min_tokens")
        )
    raise ConfigError(f"unknown policy {name!r} (known: wait_all, quorum, deadline, partial)")


def parse_policy(text: str) -> Policy:
    """Parse the policy language: ``"quorum(3) | deadline(2.0, min_k=1, partial=true)"``.

    Raises :class:`moa_stream.ConfigError` with a message naming what is wrong.
    """
    parser = _Parser(text)
    try:
        policy = parser.parse()
    except ConfigError as exc:
        if not parser.notes:
            raise
        raise ConfigError("; ".join([str(exc), *parser.notes])) from None
    if parser.notes:
        raise ConfigError("; ".join(parser.notes))
    return policy
