"""Prometheus metrics, rendered by hand in the text exposition format 0.0.4.

Three metric types and a registry are all the server needs, and writing them keeps the package
free of another dependency. Labels only ever take values the server chose (a configured MoA id,
``"unknown"``, a provider name, an error kind), never text from a request, so no client can
grow the number of series.

The metrics of the server are the attributes of :class:`ServerMetrics`; ``docs/server.md``
lists them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from moa_stream.server._shared_metrics import SharedMetrics

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "ServerMetrics",
]

#: The Content-Type of the text format, as Prometheus expects it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds. TTFT of a MoA spans tens of milliseconds (simulated, cached) to a minute (reasoning
#: proposers and wait-all policies).
LATENCY_BUCKETS = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(values)}")
        return tuple(values)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterable[str]:
        raise NotImplementedError  # pragma: no cover

    def state(self) -> list[Any]:
        """The series as JSON-ready data, for another process to add up (see :meth:`absorb`)."""
        raise NotImplementedError  # pragma: no cover

    def absorb(self, state: list[Any]) -> None:
        """Add the series of another process's :meth:`state` to this metric's."""
        raise NotImplementedError  # pragma: no cover

    def empty(self) -> Self:
        """A metric like this one with no observations."""
        return type(self)(self.name, self.help, self.label_names)


_M = TypeVar("_M", bound=_Metric)


class Counter(_Metric):
    """A value that only goes up, per label combination."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (at least 0) to the series of ``labels``."""
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The series' current value (0 if it was never incremented)."""
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"

    def state(self) -> list[Any]:
        return [[list(key), value] for key, value in self._values.items()]

    def absorb(self, state: list[Any]) -> None:
        for key, value in state:
            k = self._key(key)
            self._values[k] = self._values.get(k, 0.0) + value


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def set(self, value: float, *labels: str) -> None:
        """Set the series of ``labels`` to ``value``."""
        self._values[self._key(labels)] = value

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (may be negative)."""
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.inc(*labels, amount=-amount)

    def value(self, *labels: str) -> float:
        """The series' current value."""
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"

    def state(self) -> list[Any]:
        return [[list(key), value] for key, value in self._values.items()]

    def absorb(self, state: list[Any]) -> None:
        # Summed: the server's one gauge (requests running now) adds up over processes.
        for key, value in state:
            self.inc(*key, amount=value)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("buckets must be increasing")
        self.buckets = tuple(float(b) for b in buckets)
        # Per series: one count per finite bucket plus +Inf (not cumulative), sum, count.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        """Count one observation of ``value`` in the series of ``labels``."""
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        counts, totals = series
        counts[bisect.bisect_left(self.buckets, value)] += 1
        totals[0] += value
        totals[1] += 1

    def count(self, *labels: str) -> int:
        """How many observations the series of ``labels`` has."""
        series = self._series.get(self._key(labels))
        return 0 if series is None else int(series[1][1])

    def samples(self) -> Iterable[str]:
        names = self.label_names
        for key, (counts, (total, n)) in sorted(self._series.items()):
            cumulative = 0
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += c
                le = f'le="{_number(bound)}"' if math.isinf(bound) else f'le="{bound!r}"'
                yield f"{self.name}_bucket{_labels(names, key, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(names, key)} {_number(total)}"
            yield f"{self.name}_count{_labels(names, key)} {_number(n)}"

    def state(self) -> list[Any]:
        return [[list(key), counts, totals] for key, (counts, totals) in self._series.items()]

    def absorb(self, state: list[Any]) -> None:
        for key, counts, (total, n) in state:
            k = self._key(key)
            if len(counts) != len(self.buckets) + 1:
                raise ValueError(f"{self.name}: a snapshot with other buckets")
            series = self._series.get(k)
            if series is None:
                series = self._series[k] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
            mine, totals = series
            for i, c in enumerate(counts):
                mine[i] += c
            totals[0] += total
            totals[1] += n

    def empty(self) -> Self:
        return type(self)(self.name, self.help, self.label_names, self.buckets)


class Registry:
    """The metrics to expose, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _M) -> _M:
        """Add ``metric``; returns it, for ``x = registry.register(Counter(...))``."""
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"a metric named {metric.name} is already registered")
        self._metrics.append(metric)
        return metric

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return self._render(self._metrics)

    @staticmethod
    def _render(metrics: Iterable[_Metric]) -> bytes:
        lines: list[str] = []
        for metric in metrics:
            lines += metric.header()
            lines += metric.samples()
        return ("\n".join(lines) + "\n").encode()

    def snapshot(self) -> dict[str, list[Any]]:
        """Every metric's series, JSON-ready, keyed by metric name."""
        return {m.name: m.state() for m in self._metrics}

    def render_sum(self, snapshots: Iterable[Mapping[str, list[Any]]]) -> bytes:
        """The exposition text of these metrics added up over ``snapshots`` (this registry's
        own figures are not included unless one of them is its own :meth:`snapshot`).
        Series of metrics this registry does not have are ignored."""
        totals = [m.empty() for m in self._metrics]
        for snapshot in snapshots:
            for metric in totals:
                state = snapshot.get(metric.name)
                if state:
                    metric.absorb(state)
        return self._render(totals)


class ServerMetrics:
    """The server's metrics. Updated by the request handlers; rendered by ``GET /metrics``."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.register(
            Counter(
                "moa_stream_requests_total",
                "Chat-completion requests by MoA id and outcome (ok, invalid_request, "
                "unauthorized, rate_limited, upstream_error, timeout, client_disconnected, "
                "shutting_down, internal_error).",
                ("model", "outcome"),
            )
        )
        self.active_streams = r.register(
            Gauge(
                "moa_stream_active_streams",
                "Chat-completion requests running now, streamed or not.",
            )
        )
        self.ttft = r.register(
            Histogram(
                "moa_stream_ttft_seconds",
                "From the request's arrival to the first answer token written to the client.",
                ("model",),
            )
        )
        self.time_to_quorum = r.register(
            Histogram(
                "moa_stream_time_to_quorum_seconds",
                "From the run's start to its first layer's decision to go on.",
                ("model",),
            )
        )
        self.duration = r.register(
            Histogram(
                "moa_stream_request_duration_seconds",
                "From the request's arrival to its last byte.",
                ("model",),
            )
        )
        self.tokens = r.register(
            Counter(
                "moa_stream_tokens_total",
                "Tokens of every agent request, by MoA id and kind (prompt or completion).",
                ("model", "kind"),
            )
        )
        self.upstream_errors = r.register(
            Counter(
                "moa_stream_upstream_errors_total",
                "Failed agent requests by provider and error kind (rate_limit, server, "
                "first_token_timeout, ...).",
                ("provider", "kind"),
            )
        )

        #: Set by ``moa-stream serve --workers N``: then :meth:`render` adds up every worker.
        self.shared: SharedMetrics | None = None

    def render(self) -> bytes:
        """The exposition text (of every worker, when :attr:`shared` is set)."""
        if self.shared is not None:
            return self.shared.render()
        return self.registry.render()
