"""``GET /metrics`` is valid Prometheus text (format 0.0.4) and counts what happened."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from support.requests import CHAT, body
from support.server import Running, stream

from moa_stream.server.metrics import Counter, Gauge, Histogram, Registry

# The grammar of the text format, strictly: names, label sets, values.
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)"
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? ({VALUE})(?: -?\d+)?$")
HELP = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Family:
    kind: str
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Parse exposition text, failing on anything the format does not allow."""
    assert text.endswith("\n"), "the text must end with a line feed"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if m := HELP.match(line):
            assert m.group(1) not in helps, f"second HELP for {m.group(1)}"
            helps[m.group(1)] = m.group(2)
            continue
        if m := TYPE.match(line):
            name = m.group(1)
            assert name not in families, f"second TYPE for {name}"
            families[name] = Family(m.group(2), helps.get(name, ""))
            current = name
            continue
        assert not line.startswith("#"), f"bad comment line {line!r}"
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert current is not None, "sample before any TYPE"
        family = families[current]
        suffixes = ("_bucket", "_sum", "_count") if family.kind == "histogram" else ("",)
        assert any(name == current + s for s in suffixes), f"{name} outside its family {current}"
        parsed = dict(LABEL_PAIR.findall(labels))
        family.samples.append((name, parsed, float(value.replace("Inf", "inf"))))
    for name, family in families.items():
        if family.kind == "counter":
            assert name.endswith("_total")
        if family.kind == "histogram":
            check_histogram(name, family)
    return families


def check_histogram(name: str, family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for sample, labels, value in family.samples:
        le = labels.pop("le", None)
        key = tuple(sorted(labels.items()))
        if sample.endswith("_bucket"):
            assert le is not None
            series[key]["buckets"].append((float(le.replace("Inf", "inf")), value))
        else:
            series[key][sample.removeprefix(name)].append((0.0, value))
    for parts in series.values():
        buckets = parts["buckets"]
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts[-1] == parts["_count"][0][1]
        assert len(parts["_sum"]) == 1


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_count")] if name.endswith("_count") else families[name]
    matches = [v for n, lab, v in family.samples if n == name and lab == labels]
    assert len(matches) <= 1
    return matches[0] if matches else 0.0


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, Family]:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(await resp.text())


async def test_metrics_parse_and_count(srv: Running, session: aiohttp.ClientSession) -> None:
    families = await scrape(session, srv.url)
    assert set(families) >= {
        "moa_stream_requests_total",
        "moa_stream_active_streams",
        "moa_stream_ttft_seconds",
        "moa_stream_time_to_quorum_seconds",
        "moa_stream_upstream_errors_total",
    }
    assert value(families, "moa_stream_active_streams") == 0

    for _ in range(3):
        sse = await stream(session, srv.url, body())
        assert sse.status == 200
    async with session.post(srv.url + CHAT, json=body()) as resp:
        assert resp.status == 200
    sse = await stream(session, srv.url, body("degraded"))
    async with session.post(srv.url + CHAT, json=body("no-such-model")) as resp:
        assert resp.status == 404
    async with session.post(srv.url + CHAT, json=body("agg-broken")) as resp:
        assert resp.status == 502
    async with session.post(srv.url + CHAT, data=b"{") as resp:
        assert resp.status == 400

    families = await scrape(session, srv.url)
    requests = "moa_stream_requests_total"
    assert value(families, requests, model="fast", outcome="ok") == 4
    assert value(families, requests, model="degraded", outcome="ok") == 1
    assert value(families, requests, model="unknown", outcome="invalid_request") == 2
    assert value(families, requests, model="agg-broken", outcome="upstream_error") == 1
    # TTFT is measured for streamed answers; time to quorum for every run with proposers.
    assert value(families, "moa_stream_ttft_seconds_count", model="fast") == 3
    assert value(families, "moa_stream_time_to_quorum_seconds_count", model="fast") == 4
    errors = "moa_stream_upstream_errors_total"
    # One failing proposer (degraded), one failing aggregator (agg-broken).
    assert value(families, errors, provider="sim", kind="server") == 2
    assert value(families, "moa_stream_active_streams") == 0
    assert value(families, "moa_stream_tokens_total", model="fast", kind="completion") > 0


async def test_mid_stream_aggregator_failure_is_counted(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body("agg-midfail"))
    assert orjson.loads(sse.data[-2])["error"]["code"] == "aggregator_failed"
    families = await scrape(session, srv.url)
    assert value(families, "moa_stream_upstream_errors_total", provider="sim", kind="upstream") == 1
    assert (
        value(families, "moa_stream_requests_total", model="agg-midfail", outcome="upstream_error")
        == 1
    )


def test_rendering_escapes_and_formats() -> None:
    registry = Registry()
    c = registry.register(Counter("x_total", "help with \\ and\nnewline", ("a",)))
    g = registry.register(Gauge("g", "a gauge"))
    h = registry.register(Histogram("h_seconds", "a histogram", ("m",), buckets=(0.1, 1.0)))
    c.inc('quote " backslash \\ newline \n')
    c.inc("plain", amount=2.5)
    g.set(-3)
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v, "m1")
    text = registry.render().decode()
    families = parse(text)
    assert families["x_total"].help == "help with \\\\ and\\nnewline"
    assert 'a="quote \\" backslash \\\\ newline \\n"' in text
    assert 'x_total{a="plain"} 2.5' in text
    assert "g -3" in text
    assert 'h_seconds_bucket{m="m1",le="0.1"} 2' in text
    assert 'h_seconds_bucket{m="m1",le="1.0"} 3' in text
    assert 'h_seconds_bucket{m="m1",le="+Inf"} 4' in text
    assert 'h_seconds_count{m="m1"} 4' in text
    assert h.count("m1") == 4


def test_metric_misuse_is_refused() -> None:
    registry = Registry()
    c = registry.register(Counter("x_total", "x", ("a",)))
    with pytest.raises(ValueError, match="labels"):
        c.inc()
    with pytest.raises(ValueError, match="down"):
        c.inc("a", amount=-1)
    with pytest.raises(ValueError, match="already"):
        registry.register(Counter("x_total", "again"))
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "h", buckets=(1.0, 0.5))


def test_snapshots_of_several_processes_add_up() -> None:
    def registry() -> tuple[Registry, Counter, Gauge, Histogram]:
        r = Registry()
        c = r.register(Counter("c_total", "c", ("model",)))
        g = r.register(Gauge("g", "g"))
        h = r.register(Histogram("h_seconds", "h", ("model",), buckets=(0.1, 1.0)))
        return r, c, g, h

    one, c1, g1, h1 = registry()
    two, c2, g2, h2 = registry()
    c1.inc("a")
    c2.inc("a", amount=2)
    c2.inc("b")
    g1.inc()
    g2.inc(amount=2)
    h1.observe(0.05, "a")
    h2.observe(0.5, "a")
    h2.observe(5.0, "a")
    # Through JSON, as the workers' files carry them.
    snapshots = [orjson.loads(orjson.dumps(r.snapshot())) for r in (one, two)]
    text = one.render_sum(snapshots).decode()
    families = parse(text)  # checks each histogram's buckets too
    assert value(families, "c_total", model="a") == 3
    assert value(families, "c_total", model="b") == 1
    assert value(families, "g") == 3
    assert value(families, "h_seconds_count", model="a") == 3
    assert 'h_seconds_bucket{model="a",le="1.0"} 2\n' in text
    assert one.render_sum([]) == registry()[0].render(), "nothing observed: zeroes"
