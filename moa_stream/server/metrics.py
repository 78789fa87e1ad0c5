"""Prometheus metrics, rendered by hand in the text exposition format 0.0.4.

The server's own metrics are three small metric types and a registry written here; the
process figures (CPU, memory, file descriptors, start time, ``python_info``) are read by
``prometheus_client``'s collectors at each scrape (:class:`ProcessMetrics`). Why not
``prometheus_client`` for everything: an observation costs 0.35 µs here against 0.75 µs for a
``prometheus_client`` histogram child (2.1 µs in its multiprocess mode, 4.6 µs with the label
look-up), the workers of ``serve --workers N`` already add up their snapshots
(:mod:`moa_stream.server._shared_metrics`), and ``prometheus_client``'s multiprocess mode leaves
the process metrics out. ``docs/server.md`` has the measurement.

Labels only ever take values the server chose (a configured MoA id or agent name,
``"unknown"``, a provider name, an error kind, a fixed word), never text from a request, so no
client can grow the number of series.

The metrics of the server are the attributes of :class:`ServerMetrics`; ``docs/server.md``
lists them.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

from prometheus_client import PlatformCollector, ProcessCollector

if TYPE_CHECKING:
    from moa_stream.engine.events import RunReport
    from moa_stream.server._shared_metrics import SharedMetrics

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "ProcessMetrics",
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

#: Seconds between two answer chunks: tokens of a fast model come milliseconds apart, a stall
#: lasts seconds.
GAP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Staircase steps asked for one answer.
STEP_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)

#: A gap between two answer chunks longer than this (seconds) is a stall.
STALL_SECONDS = 1.0


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


class _Scalar(_Metric):
    """A metric with one number per label combination: a counter's or a gauge's."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def _add(self, labels: Sequence[str], amount: float) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The series' current value (0 if it was never changed)."""
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"

    def state(self) -> list[Any]:
        return [[list(key), value] for key, value in self._values.items()]

    def absorb(self, state: list[Any]) -> None:
        # Summed, gauges too: the server's one gauge (requests running now) adds up over
        # processes.
        for key, value in state:
            self._add(key, value)


class Counter(_Scalar):
    """A value that only goes up, per label combination."""

    kind = "counter"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (at least 0) to the series of ``labels``."""
        if amount < 0:
            raise ValueError("a counter cannot go down")
        self._add(labels, amount)


class Gauge(_Scalar):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        if not labels:
            self._values[()] = 0.0

    def set(self, value: float, *labels: str) -> None:
        """Set the series of ``labels`` to ``value``."""
        self._values[self._key(labels)] = value

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (may be negative)."""
        self._add(labels, amount)

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self._add(labels, -amount)


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

    def _series_of(self, key: tuple[str, ...]) -> tuple[list[int], list[float]]:
        """The counts and totals of the series ``key``, made empty on first use."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        return series

    def observe(self, value: float, *labels: str) -> None:
        """Count one observation of ``value`` in the series of ``labels``."""
        counts, totals = self._series_of(self._key(labels))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        totals[0] += value
        totals[1] += 1

    def observe_many(self, values: Sequence[float], *labels: str) -> None:
        """Count every value of ``values`` in the series of ``labels`` (one look-up for all)."""
        if not values:
            return
        counts, totals = self._series_of(self._key(labels))
        buckets = self.buckets
        place = bisect.bisect_left
        for value in values:
            counts[place(buckets, value)] += 1
        totals[0] += sum(values)
        totals[1] += len(values)

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
            mine, totals = self._series_of(k)
            for i, c in enumerate(counts):
                mine[i] += c
            totals[0] += total
            totals[1] += n

    def empty(self) -> Self:
        return type(self)(self.name, self.help, self.label_names, self.buckets)


#: A family as :class:`ProcessMetrics` keeps it: name, type, help, [[sample, labels, value]].
_Family = list[Any]

_COLLECTORS: list[Any] = []


def _collectors() -> list[Any]:
    # Made once, on first use: each reads the platform (clock ticks, page size) when made.
    if not _COLLECTORS:
        _COLLECTORS.extend((ProcessCollector(registry=None), PlatformCollector(registry=None)))
    return _COLLECTORS


def read_process() -> list[_Family]:
    """This process's figures, as ``prometheus_client``'s process and platform collectors read
    them (``process_*`` from ``/proc``, so nothing but ``python_info`` off Linux)."""
    families: list[_Family] = []
    for collector in _collectors():
        for family in collector.collect():
            samples = [[s.name, dict(s.labels), s.value] for s in family.samples]
            families.append([family.name, family.type, family.documentation, samples])
    return families


class ProcessMetrics(_Metric):
    """The standard process metrics of ``prometheus_client`` (``process_cpu_seconds_total``,
    ``process_resident_memory_bytes``, ``process_open_fds``, ``process_start_time_seconds``
    ...) and ``python_info``, read when rendered.

    Added up over workers (:meth:`Registry.render_sum`) they are not summed: each worker's
    series is kept, labelled with its ``pid``.
    """

    kind = "process"

    def __init__(self, name: str = "process", help: str = "", labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        #: The workers' figures, by pid; ``None`` for this process's own, read when rendered.
        self._workers: list[tuple[str, list[_Family]]] | None = None

    def header(self) -> list[str]:
        return []  # one per family, in samples()

    def samples(self) -> Iterable[str]:
        if self._workers is None:
            return self._lines([("", read_process())])
        return self._lines(self._workers)

    @staticmethod
    def _lines(workers: Sequence[tuple[str, list[_Family]]]) -> list[str]:
        order: list[str] = []
        heads: dict[str, tuple[str, str]] = {}
        rows: dict[str, list[str]] = {}
        for pid, families in workers:
            for name, kind, help, samples in families:
                if name not in heads:
                    order.append(name)
                    heads[name] = (kind, help)
                    rows[name] = []
                for sample, labels, value in samples:
                    keys = sorted(labels)
                    names = [*keys, "pid"] if pid else keys
                    values = [str(labels[k]) for k in keys] + ([pid] if pid else [])
                    rows[name].append(f"{sample}{_labels(names, values)} {_number(value)}")
        lines: list[str] = []
        for name in order:
            kind, help = heads[name]
            # The text format names a counter's family after its sample (..._total).
            shown = f"{name}_total" if kind == "counter" else name
            lines.append(f"# HELP {shown} {_escape_help(help)}")
            lines.append(f"# TYPE {shown} {kind if kind in ('counter', 'gauge') else 'untyped'}")
            lines += rows[name]
        return lines

    def state(self) -> list[Any]:
        if self._workers is None:
            return [[str(os.getpid()), read_process()]]
        return [[pid, families] for pid, families in self._workers]

    def absorb(self, state: list[Any]) -> None:
        if self._workers is None:
            self._workers = []
        self._workers += [(str(pid), families) for pid, families in state]

    def empty(self) -> Self:
        other = type(self)(self.name, self.help, self.label_names)
        other._workers = []
        return other


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
                "Tokens of every agent request, by MoA id and kind (prompt, completion, and "
                "cached_prompt: the part of the prompt read from a prompt cache).",
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
        self.inter_token_latency = r.register(
            Histogram(
                "moa_stream_inter_token_latency_seconds",
                "Gaps between two answer chunks written to the client, one sample per gap "
                "(streamed requests).",
                ("model",),
                buckets=GAP_BUCKETS,
            )
        )
        self.stalls = r.register(
            Counter(
                "moa_stream_stalls_total",
                "Gaps of more than one second between two answer chunks written to the client.",
                ("model",),
            )
        )
        self.staircase_steps = r.register(
            Histogram(
                "moa_stream_staircase_steps",
                "Staircase steps asked per answer (MoAs with a staircase aggregator).",
                ("model",),
                buckets=STEP_BUCKETS,
            )
        )
        self.staircase_rejected = r.register(
            Counter(
                "moa_stream_staircase_rejected_steps_total",
                "Staircase steps whose first words were not passed on, by reason (restart, "
                "markup, not ready in time, an error kind ...).",
                ("model", "reason"),
            )
        )
        agent = ("model", "agent", "role")
        self.agent_requests = r.register(
            Counter(
                "moa_stream_agent_requests_total",
                "Agent requests by MoA id, agent, role (proposer or aggregator) and outcome "
                "(complete, partial, failed, cancelled).",
                (*agent, "outcome"),
            )
        )
        self.agent_ttft = r.register(
            Histogram(
                "moa_stream_agent_ttft_seconds",
                "From an agent request's start to its first token.",
                agent,
            )
        )
        self.agent_duration = r.register(
            Histogram(
                "moa_stream_agent_duration_seconds",
                "From an agent request's start to its end (finished, failed or cancelled).",
                agent,
            )
        )
        self.agent_hedges = r.register(
            Counter(
                "moa_stream_agent_hedges_total",
                "Agent requests hedged (a copy sent to the backup), by the copy that streamed "
                "first (primary, backup, none).",
                (*agent, "winner"),
            )
        )
        self.agent_tokens = r.register(
            Counter(
                "moa_stream_agent_tokens_total",
                "Tokens of every agent request by kind (prompt, cached_prompt, completion); "
                'estimated="true" where the upstream sent no counts and they were estimated.',
                (*agent, "kind", "estimated"),
            )
        )
        self.process = r.register(ProcessMetrics())

        #: Set by ``moa-stream serve --workers N``: then :meth:`render` adds up every worker.
        self.shared: SharedMetrics | None = None

    def observe_chunks(self, model: str, times: Sequence[float]) -> None:
        """The gaps between the answer chunks of one stream, written at ``times`` (monotonic
        seconds): observed once, at the end of the stream, so the stream pays one ``append``
        per chunk."""
        if len(times) < 2:
            return
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.inter_token_latency.observe_many(gaps, model)
        stalls = sum(gap > STALL_SECONDS for gap in gaps)
        if stalls:
            self.stalls.inc(model, amount=stalls)

    def observe_report(self, model: str, report: RunReport) -> None:
        """A finished run's figures: time to quorum, and tokens and outcome of every agent
        request."""
        if report.time_to_quorum_s is not None:
            self.time_to_quorum.observe(report.time_to_quorum_s, model)
        usage = report.usage
        self.tokens.inc(model, "prompt", amount=usage.prompt_tokens)
        self.tokens.inc(model, "completion", amount=usage.completion_tokens)
        if usage.cached_prompt_tokens:
            self.tokens.inc(model, "cached_prompt", amount=usage.cached_prompt_tokens)
        for a in report.agents:
            self.agent_requests.inc(model, a.agent, a.role, a.status)
            if a.ttft_s is not None:
                self.agent_ttft.observe(a.ttft_s, model, a.agent, a.role)
            if a.duration_s is not None:
                self.agent_duration.observe(a.duration_s, model, a.agent, a.role)
            if a.hedge is not None:
                self.agent_hedges.inc(model, a.agent, a.role, a.hedge.winner or "none")
            u = a.usage
            estimated = "true" if u.estimated else "false"
            tokens = self.agent_tokens
            tokens.inc(model, a.agent, a.role, "prompt", estimated, amount=u.prompt_tokens)
            tokens.inc(model, a.agent, a.role, "completion", estimated, amount=u.completion_tokens)
            if u.cached_prompt_tokens:
                tokens.inc(
                    model,
                    a.agent,
                    a.role,
                    "cached_prompt",
                    estimated,
                    amount=u.cached_prompt_tokens,
                )

    def render(self) -> bytes:
        """The exposition text (of every worker, when :attr:`shared` is set)."""
        if self.shared is not None:
            return self.shared.render()
        return self.registry.render()
