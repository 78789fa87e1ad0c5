"""The reference MoA: the original method, as the baseline every strategy is measured against.

It runs the way the original implementation does: each layer's proposers are asked at once
with ordinary *non-streaming* requests (one JSON response each, read whole), the layer waits
for all of them, and only then does the next layer (with the previous answers as references) or
the aggregator start. The aggregator's answer is streamed to the user. It uses plain aiohttp for
the proposers, not the engine, so that nothing of the engine's machinery flatters or burdens it;
the references are laid out with the same prompt builder, so both sides send the same prompts.

Where the original crashes once its retries run out, this one drops the failed proposer and
goes on: a benchmark run should end with numbers, not a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream._wire import chat_request_body, parse_retry_after
from moa_stream.bench._recording import LoggedCall, current_log
from moa_stream.bench.trace import CallStatus, CallTrace, LayerTrace, RefTrace, RunTrace
from moa_stream.engine.layer import Reference
from moa_stream.engine.prompts import PromptTemplates, build_reference_messages
from moa_stream.engine.spec import Agent

__all__ = [
    "ChatAPI",
    "Completion",
    "Endpoint",
    "ReferenceMoA",
    "ReferenceResult",
    "complete",
    "run_reference",
]

_RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class ChatAPI:
    """An OpenAI-compatible chat API reached directly, without a provider (the reference MoA's
    non-streaming calls): the API root where an agent's model is served, the headers to send
    (auth included) and the name the API gives the token limit."""

    base_url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_tokens_field: str = "max_tokens"


#: The name this class had before: kept so that existing code keeps working.
Endpoint = ChatAPI


@dataclass(frozen=True, slots=True)
class ReferenceMoA:
    """The original MoA over ``proposers`` (``layers`` layers) and ``aggregator``."""

    proposers: tuple[Agent, ...]
    aggregator: Agent
    layers: int = 1
    templates: PromptTemplates = field(default_factory=PromptTemplates)
    max_attempts: int = 3
    name: str = "reference-moa"


@dataclass(frozen=True, slots=True)
class Completion:
    """One non-streamed answer (``text`` is ``None`` if every attempt failed)."""

    text: str | None
    usage: Usage
    attempts: int
    started: float
    ended: float
    error: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceResult:
    """The run's answer, usage and trace; ``chunk_times`` are when each content chunk of the
    answer arrived, in seconds since the run started."""

    text: str
    usage: Usage
    trace: RunTrace
    error: str | None = None
    chunk_times: tuple[float, ...] = ()


def _retry_delay(resp: aiohttp.ClientResponse | None, attempt: int) -> float:
    if resp is not None:
        asked = parse_retry_after(resp.headers)
        if asked is not None:
            return asked
    return 0.2 * 2.0 ** (attempt - 1)


async def complete(
    session: aiohttp.ClientSession,
    base_url: str,
    request: ChatRequest,
    *,
    headers: Mapping[str, str] | None = None,
    max_tokens_field: str = "max_tokens",
    max_attempts: int = 3,
    clock: Callable[[], float] = time.monotonic,
) -> Completion:
    """Ask for one non-streamed chat completion; retry 408, 429, 5xx and connection failures."""
    body = chat_request_body(request, stream=False, max_tokens_field=max_tokens_field)
    # The reference MoA reads whole answers, whatever the agent's extra fields ask for.
    body["stream"] = False
    data = orjson.dumps(body)
    url = base_url.rstrip("/") + "/chat/completions"
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    started = clock()
    error = "no attempt made"
    attempt = 0
    while attempt < max_attempts:
        attempt += 1
        resp: aiohttp.ClientResponse | None = None
        try:
            async with session.post(url, data=data, headers=all_headers) as resp:
                raw = await resp.read()
                if resp.status == 200:
                    payload = orjson.loads(raw)
                    text = payload["choices"][0]["message"].get("content") or ""
                    usage = payload.get("usage") or {}
                    return Completion(
                        text,
                        Usage(
                            int(usage.get("prompt_tokens", 0)),
                            int(usage.get("completion_tokens", 0)),
                        ),
                        attempt,
                        started,
                        clock(),
                        request_id=resp.headers.get("x-request-id"),
                    )
                error = f"HTTP {resp.status}"
                if resp.status not in _RETRIED_STATUS:
                    break
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError, KeyError, IndexError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            resp = None
        if attempt < max_attempts:
            await asyncio.sleep(_retry_delay(resp, attempt))
    chars = sum(len(m["content"]) for m in request.messages)
    return Completion(None, Usage(chars // 4, 0, estimated=True), attempt, started, clock(), error)


async def run_reference(
    spec: ReferenceMoA,
    messages: Sequence[ChatMessage],
    *,
    session: aiohttp.ClientSession,
    endpoints: Mapping[str, ChatAPI],
    clock: Callable[[], float] = time.monotonic,
) -> ReferenceResult:
    """Run ``spec`` on ``messages``. ``endpoints`` maps each proposer's name to its
    :class:`ChatAPI`. Requests are logged into the current call log."""
    t0 = clock()
    log = current_log.get()
    calls: list[CallTrace] = []
    layers: list[LayerTrace] = []
    usage = Usage()
    refs: list[Reference] | None = None
    for li in range(spec.layers):
        requests = []
        for agent in spec.proposers:
            msgs = list(messages) if refs is None else _with_refs(spec, agent, messages, refs)
            requests.append(agent.request(msgs))
        layer_start = clock()
        results = await asyncio.gather(
            *(
                complete(
                    session,
                    endpoints[agent.name].base_url,
                    request,
                    headers=dict(endpoints[agent.name].headers),
                    max_tokens_field=endpoints[agent.name].max_tokens_field,
                    max_attempts=spec.max_attempts,
                    clock=clock,
                )
                for agent, request in zip(spec.proposers, requests, strict=True)
            )
        )
        decided = clock()
        refs = []
        ref_traces = []
        for index, (agent, request, result) in enumerate(
            zip(spec.proposers, requests, results, strict=True)
        ):
            if log is not None:
                log.calls.append(LoggedCall(request, attempts=result.attempts))
            usage = usage + result.usage
            ok = result.text is not None
            calls.append(
                CallTrace(
                    role="proposer",
                    layer=li,
                    index=index,
                    agent=agent.name,
                    model=agent.model,
                    status="complete" if ok else "failed",
                    started_s=layer_start - t0,
                    ttft_s=None,
                    duration_s=result.ended - result.started,
                    streamed=False,
                    request=request,
                    tries=result.attempts,
                    request_id=result.request_id,
                )
            )
            text = result.text or ""
            refs.append(Reference(agent.name, index, "complete" if ok else "failed", text))
            ref_traces.append(RefTrace(index, "complete" if ok else "failed", len(text)))
        layers.append(LayerTrace(li, "all", decided - t0, tuple(ref_traces)))

    agent = spec.aggregator
    msgs = list(messages) if refs is None else _with_refs(spec, agent, messages, refs)
    request = agent.request(msgs)
    started = clock()
    first: float | None = None
    parts: list[str] = []
    chunk_times: list[float] = []
    error: str | None = None
    status: CallStatus = "complete"
    stream = agent.provider.stream(request)
    try:
        async with stream:
            async for delta in stream:
                if delta.content:
                    now = clock()
                    if first is None:
                        first = now
                    chunk_times.append(now - t0)
                    parts.append(delta.content)
    except Exception as exc:  # the run's failure is a result to report, not a crash
        error = f"{type(exc).__name__}: {exc}"
        status = "failed"
    ended = clock()
    usage = usage + (stream.usage or Usage())
    calls.append(
        CallTrace(
            role="aggregator",
            layer=spec.layers,
            index=0,
            agent=agent.name,
            model=agent.model,
            status=status,
            started_s=started - t0,
            ttft_s=None if first is None else first - started,
            duration_s=ended - started,
            request=request,
            tries=max(1, stream.timings.attempts),
            request_id=getattr(stream, "request_id", None),
        )
    )
    ttft = None if first is None else first - t0
    trace = RunTrace(tuple(calls), tuple(layers), ttft, ended - t0, started_at=t0)
    return ReferenceResult("".join(parts), usage, trace, error, tuple(chunk_times))


def _with_refs(
    spec: ReferenceMoA, agent: Agent, messages: Sequence[ChatMessage], refs: Sequence[Reference]
) -> list[ChatMessage]:
    # Failed proposers are left out, as the original leaves out what it did not get.
    usable = [r for r in refs if r.status == "complete"]
    if not usable:
        return list(messages)
    return build_reference_messages(
        messages, usable, templates=spec.templates, system_prompt=agent.system_prompt
    )
