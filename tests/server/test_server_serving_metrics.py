"""The metrics a serving engineer reads: inter-token latency and stalls, staircase steps, each
agent's requests, and the process's own figures."""

from __future__ import annotations

import os
import sys

import aiohttp
import orjson
import pytest
from support.requests import body
from support.server import Running, serving, stairs_config, stream
from test_server_metrics import Family, parse, scrape, value

from moa_stream._types import Usage
from moa_stream.engine.events import AgentReport, HedgeInfo, RunReport
from moa_stream.server.metrics import ServerMetrics

LINUX = sys.platform.startswith("linux")


def histogram(families: dict[str, Family], name: str, suffix: str, **labels: str) -> float:
    """A histogram's ``_sum`` or ``_count`` sample (0 if absent)."""
    found = [v for n, lab, v in families[name].samples if n == name + suffix and lab == labels]
    return found[0] if found else 0.0


async def test_a_stream_records_its_gaps_and_each_agent(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body())
    assert sse.status == 200
    chunks = [
        d
        for d in sse.data[:-1]
        if orjson.loads(d)["choices"] and orjson.loads(d)["choices"][0]["delta"].get("content")
    ]
    families = await scrape(session, srv.url)
    # One sample per gap between two content chunks.
    itl = value(families, "moa_stream_inter_token_latency_seconds_count", model="fast")
    assert itl == len(chunks) - 1 > 0
    assert value(families, "moa_stream_stalls_total", model="fast") == 0

    requests = "moa_stream_agent_requests_total"
    for agent in ("a", "b"):
        labels = {"model": "fast", "agent": agent, "role": "proposer"}
        assert value(families, requests, **labels, outcome="complete") == 1
        assert value(families, "moa_stream_agent_ttft_seconds_count", **labels) == 1
        assert value(families, "moa_stream_agent_duration_seconds_count", **labels) == 1
    agg = {"model": "fast", "agent": "agg", "role": "aggregator"}
    assert value(families, requests, **agg, outcome="complete") == 1
    tokens = "moa_stream_agent_tokens_total"
    completion = sum(
        v
        for name, labels, v in families[tokens].samples
        if labels["model"] == "fast" and labels["kind"] == "completion"
    )
    assert completion == value(families, "moa_stream_tokens_total", model="fast", kind="completion")
    assert completion > 0
    # Every figure says whether it was estimated.
    assert {labels["estimated"] for _, labels, _ in families[tokens].samples} <= {"true", "false"}


async def test_a_failed_proposer_is_counted_as_failed(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    async with session.post(srv.url + "/v1/chat/completions", json=body("degraded")) as resp:
        assert resp.status == 200
    families = await scrape(session, srv.url)
    labels = {"model": "degraded", "role": "proposer", "agent": "broken"}
    assert value(families, "moa_stream_agent_requests_total", **labels, outcome="failed") == 1
    # A non-streamed answer writes no chunks: no inter-token samples.
    assert value(families, "moa_stream_inter_token_latency_seconds_count", model="degraded") == 0


def test_gaps_over_a_second_are_stalls() -> None:
    metrics = ServerMetrics()
    metrics.observe_chunks("m", [10.0, 10.01, 11.5, 11.52, 13.0])
    metrics.observe_chunks("m", [20.0])  # one chunk: no gap
    text = metrics.render().decode()
    families = parse(text)
    assert value(families, "moa_stream_inter_token_latency_seconds_count", model="m") == 4
    assert value(families, "moa_stream_stalls_total", model="m") == 2
    itl = "moa_stream_inter_token_latency_seconds"
    assert f'{itl}_bucket{{model="m",le="0.01"}} 1\n' in text
    assert f'{itl}_bucket{{model="m",le="1.0"}} 2\n' in text
    assert histogram(families, itl, "_sum", model="m") == pytest.approx(3.0)


def _agent(**fields: object) -> AgentReport:
    base: dict[str, object] = {
        "agent": "a",
        "model": "m1",
        "provider": "p",
        "role": "proposer",
        "layer": 0,
        "index": 0,
        "status": "complete",
        "started_s": 0.0,
        "ttft_s": 0.1,
        "duration_s": 0.5,
        "usage": Usage(100, 20),
        "chars": 80,
    }
    base.update(fields)
    return AgentReport(**base)  # type: ignore[arg-type]


def test_report_figures_per_agent_cached_estimated_and_hedged() -> None:
    agents = (
        _agent(usage=Usage(100, 20, cached_prompt_tokens=60)),
        _agent(
            agent="b",
            status="cancelled",
            ttft_s=None,
            usage=Usage(90, 5, estimated=True),
            hedge=HedgeInfo("p2/m2", 0.5, "backup"),
        ),
        _agent(agent="agg", role="aggregator", usage=Usage(300, 40)),
    )
    usage = Usage(490, 65, estimated=True, cached_prompt_tokens=60)
    report = RunReport("text", "agg", 0.3, 0.2, 0.1, 1.0, usage, (), agents)
    metrics = ServerMetrics()
    metrics.observe_report("moa", report)
    families = parse(metrics.render().decode())
    a = {"model": "moa", "agent": "a", "role": "proposer"}
    b = {"model": "moa", "agent": "b", "role": "proposer"}
    tokens = "moa_stream_agent_tokens_total"
    assert value(families, tokens, **a, kind="cached_prompt", estimated="false") == 60
    assert value(families, tokens, **a, kind="prompt", estimated="false") == 100
    assert value(families, tokens, **b, kind="completion", estimated="true") == 5
    assert value(families, "moa_stream_tokens_total", model="moa", kind="cached_prompt") == 60
    assert value(families, "moa_stream_agent_requests_total", **b, outcome="cancelled") == 1
    assert value(families, "moa_stream_agent_hedges_total", **b, winner="backup") == 1
    assert value(families, "moa_stream_agent_ttft_seconds_count", **b) == 0
    assert value(families, "moa_stream_agent_duration_seconds_count", **b) == 1
    assert value(families, "moa_stream_time_to_quorum_seconds_count", model="moa") == 1


async def test_staircase_steps_and_rejections_are_counted() -> None:
    async with serving(stairs_config(restarts=True)) as srv, aiohttp.ClientSession() as session:
        sse = await stream(session, srv.url, body("stairs"), headers={"X-MoA-Progress": "1"})
        assert sse.status == 200
        items = sse.progress()
        families = await scrape(session, srv.url)
    asked = [i for i in items if i["type"] == "aggregator.step"]
    rejected = [i for i in items if i["type"] == "aggregator.step_rejected"]
    assert asked and rejected, "the restarting aggregator's steps are rejected"
    assert value(families, "moa_stream_staircase_steps_count", model="stairs") == 1
    steps = "moa_stream_staircase_steps"
    assert histogram(families, steps, "_sum", model="stairs") == len(asked)
    by_reason: dict[str, int] = {}
    for item in rejected:
        by_reason[item["reason"]] = by_reason.get(item["reason"], 0) + 1
    for reason, n in by_reason.items():
        assert (
            value(
                families, "moa_stream_staircase_rejected_steps_total", model="stairs", reason=reason
            )
            == n
        )
    # A MoA without a staircase has no steps series.
    assert value(families, "moa_stream_staircase_steps_count", model="fast") == 0


@pytest.mark.skipif(not LINUX, reason="prometheus_client reads the process figures from /proc")
async def test_process_metrics_are_exposed(srv: Running, session: aiohttp.ClientSession) -> None:
    families = await scrape(session, srv.url)
    assert families["process_cpu_seconds_total"].kind == "counter"
    assert value(families, "process_cpu_seconds_total") > 0
    assert value(families, "process_resident_memory_bytes") > 0
    assert value(families, "process_open_fds") > 0
    assert 1e9 < value(families, "process_start_time_seconds") < 1e11
    assert families["python_info"].samples


@pytest.mark.skipif(not LINUX, reason="prometheus_client reads the process figures from /proc")
def test_process_metrics_of_workers_are_kept_apart() -> None:
    one, two = ServerMetrics(), ServerMetrics()
    snapshots = [orjson.loads(orjson.dumps(m.registry.snapshot())) for m in (one, two)]
    snapshots[1]["process"][0][0] = "4242"  # as another worker's file would say
    families = parse(one.registry.render_sum(snapshots).decode())
    pids = {labels["pid"] for _, labels, _ in families["process_resident_memory_bytes"].samples}
    assert pids == {str(os.getpid()), "4242"}
    assert len(families["process_cpu_seconds_total"].samples) == 2
