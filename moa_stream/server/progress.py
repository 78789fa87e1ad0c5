"""The MoA's progress inside a chat-completions stream, in a form standard clients skip.

Each progress item is one SSE *comment* line, ``: moa.progress {json}``, followed by a blank
line. The SSE specification makes every client ignore lines that start with ``:`` (they are
how servers send keep-alives), so an OpenAI SDK, a browser ``EventSource`` or a chat UI reads
the stream exactly as if the lines were not there, while a client that wants the progress reads
the comments. A named event (``event: moa.progress``) would not be safe: the openai-python SDK
turns the ``data:`` of any named event other than ``thread.*`` into a chunk object.

Proposer tokens are not forwarded one by one (a MoA of four proposers would send five times
the answer's traffic); ``proposer.tokens`` reports each running proposer's tokens so far at most
every :data:`TOKENS_INTERVAL` seconds instead. Those are estimates from the characters received
(:func:`moa_stream.estimate_tokens`, the rule the providers use when a server sends no usage)
and say so (``"estimated": true``); an item carrying a call's usage (``proposer.done``,
``aggregator.done``) has the provider's figure and the same flag.

A client that wants to show the proposers' text (the playground page does) asks for the
``text`` level: ``proposer.text`` items then carry each proposer's new text, batched per layer
at most every :data:`TEXT_INTERVAL` seconds, and flushed before that proposer's
``proposer.done`` or ``proposer.failed`` and before ``layer.done``, so a client holds every
proposer's text by the time it learns what became of it. Each ``proposer.text`` item is
followed by the layer's ``proposer.tokens`` item, so the counts a client shows always match
the text it holds.
Each item of the server's streams also says where it belongs (given a ``request_id``, as the
server always does): ``request_id`` (the response's ``X-Request-Id``), ``seq`` (0, 1, 2 ... per
request, in the order the items were written) and ``ts`` (when the item was made, in seconds
since the Unix epoch, to the millisecond). A client that logs items of many requests, or
gathers them from several server instances, can then join and order them; ``t`` stays the time
since the run started.
The JSON of each item is documented in ``docs/server.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from moa_stream._types import Usage, estimate_tokens
from moa_stream._wire import usage_object
from moa_stream.engine.events import Event, LayerReport, ReferenceInfo, RunReport

__all__ = ["PREFIX", "TEXT_INTERVAL", "TOKENS_INTERVAL", "ProgressEncoder", "report_object"]

#: What every progress comment line starts with.
PREFIX = b": moa.progress "

#: Seconds between two ``proposer.tokens`` items of one layer.
TOKENS_INTERVAL = 0.25

#: Seconds between two ``proposer.text`` items of one layer (the ``text`` level only): short
#: enough that text reads as streaming, long enough that a line carries several tokens.
TEXT_INTERVAL = 0.1


def _round(value: float | None) -> float | None:
    # Microseconds are noise next to network latency, and shorter numbers are fewer bytes.
    return None if value is None else round(value, 4)


def _usage(usage: Usage) -> dict[str, Any]:
    return usage_object(usage.prompt_tokens, usage.completion_tokens, estimated=usage.estimated)


#: The fields of a reference, an agent's report, a layer's report and the run's report in a
#: progress item, in this order.
_REFERENCE_FIELDS = ("agent", "index", "status", "chars", "tokens")
_AGENT_FIELDS = (
    "agent",
    "model",
    "provider",
    "role",
    "layer",
    "index",
    "status",
    "started_s",
    "ttft_s",
    "duration_s",
    "usage",
    "error",
)
_LAYER_FIELDS = ("layer", "reason", "decided_s", "references", "cut", "agreement")
_REPORT_FIELDS = (
    "ttft_s",
    "time_to_quorum_s",
    "aggregator_ttft_s",
    "total_s",
    "aggregator",
    "finish_reason",
    "usage",
    "layers",
    "agents",
    "error",
)


def _object(obj: Any, names: tuple[str, ...], **given: Any) -> dict[str, Any]:
    """The fields ``names`` of ``obj`` as JSON-ready data: times (``*_s``) rounded, usage as its
    usage object, the others as they are, except those ``given`` (already converted)."""
    out: dict[str, Any] = {}
    for name in names:
        if name in given:
            out[name] = given[name]
            continue
        value = getattr(obj, name)
        if name.endswith("_s"):
            value = _round(value)
        elif name == "usage":
            value = _usage(value)
        out[name] = value
    return out


def _reference(ref: ReferenceInfo) -> dict[str, Any]:
    return _object(ref, _REFERENCE_FIELDS)


def _layer_references(report: RunReport, layer: LayerReport) -> list[dict[str, Any]]:
    # A finished proposer's tokens as its own report (and its proposer.done item) counts them.
    finished = {
        a.index: a.usage.completion_tokens
        for a in report.agents
        if a.role == "proposer" and a.layer == layer.layer and a.status == "complete"
    }
    items = []
    for ref in layer.references:
        item = _reference(ref)
        if ref.status == "complete" and ref.index in finished:
            item["tokens"] = finished[ref.index]
        items.append(item)
    return items


def report_object(report: RunReport) -> dict[str, Any]:
    """A run's report as JSON-ready data, without the answer's text (the client has it)."""
    return _object(
        report,
        _REPORT_FIELDS,
        layers=[
            _object(layer, _LAYER_FIELDS, references=_layer_references(report, layer))
            for layer in report.layers
        ],
        agents=[_object(a, _AGENT_FIELDS) for a in report.agents],
    )


def _payload(event: Event) -> dict[str, Any]:
    """An event's fields as a progress item: texts become their length, usage its completion
    tokens (and whether they are estimated), times are rounded; everything else goes as it is."""
    out: dict[str, Any] = {}
    for name in event.__dataclass_fields__:
        value = getattr(event, name)
        if name == "text":
            out["chars"] = len(value)
        elif name == "usage":
            out["tokens"] = value.completion_tokens
            out["estimated"] = value.estimated
        elif name == "references":
            out[name] = [_reference(r) for r in value]
        elif name == "report":
            out[name] = report_object(value)
        elif name == "t" or name.endswith("_s"):
            out[name] = _round(value)
        else:
            out[name] = value
    return out


class ProgressEncoder:
    """Turns the events of one run into progress comment frames (or nothing).

    Keeps per-layer character counts so that ``proposer.delta`` events become a periodic
    ``proposer.tokens`` item (tokens estimated from those characters) instead of one line per
    delta. A ``layer.done`` item reports each
    reference's tokens as the items before it did: the ``proposer.done`` figure for a finished
    proposer, the ``proposer.tokens`` count for one still streaming or failed, so that a client
    never sees two sizes for the same answer. With ``text=True`` it also keeps each proposer's
    text not yet sent, and sends it as ``proposer.text`` items.

    With ``request_id``, every item also carries ``request_id``, ``seq`` (its place among the
    request's items, from 0) and ``ts`` (``clock()`` when it was made: seconds since the
    epoch). Without it (the integrations' streams, which have no request id) items have
    neither.
    """

    __slots__ = (
        "_agents",
        "_chars",
        "_clock",
        "_done_tokens",
        "_last_text_at",
        "_last_tokens_at",
        "_pending",
        "_request_id",
        "_seq",
    )

    def __init__(
        self,
        *,
        text: bool = False,
        request_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._request_id = request_id
        self._clock = clock
        self._seq = 0
        # Layer -> characters received from each proposer (by index), the estimate's input.
        self._chars: dict[int, list[int]] = {}
        self._agents: dict[int, list[str]] = {}
        self._last_tokens_at: dict[int, float] = {}
        self._last_text_at: dict[int, float] = {}
        # Layer -> agent -> text pieces not sent yet; None when text is not forwarded.
        self._pending: dict[int, dict[str, list[str]]] | None = {} if text else None
        self._done_tokens: dict[tuple[int, int], int] = {}

    def _reference_tokens(self, layer: int, ref: ReferenceInfo) -> dict[str, Any]:
        item = _reference(ref)
        done = self._done_tokens.get((layer, ref.index))
        if done is not None:
            item["tokens"] = done
        else:
            chars = self._chars.get(layer, [])
            item["tokens"] = estimate_tokens(chars[ref.index] if ref.index < len(chars) else 0)
        return item

    def _frame(self, payload: dict[str, Any]) -> bytes:
        if self._request_id is not None:
            # Numbered as made, which is the order they are written in: a frame made is
            # always returned, and the handler writes what it gets in order.
            payload["request_id"] = self._request_id
            payload["seq"] = self._seq
            payload["ts"] = round(self._clock(), 3)
            self._seq += 1
        return PREFIX + orjson.dumps(payload) + b"\n\n"

    def _slot(self, layer: int, index: int, agent: str) -> None:
        chars = self._chars.setdefault(layer, [])
        agents = self._agents.setdefault(layer, [])
        while len(chars) <= index:
            chars.append(0)
            agents.append("")
        agents[index] = agent

    def _tokens(self, layer: int, t: float) -> dict[str, Any]:
        self._last_tokens_at[layer] = t
        return {
            "type": "proposer.tokens",
            "layer": layer,
            "tokens": {
                agent: estimate_tokens(chars)
                for agent, chars in zip(self._agents[layer], self._chars[layer], strict=True)
            },
            "estimated": True,
            "t": _round(t),
        }

    def _text(self, layer: int, t: float) -> bytes:
        """The ``proposer.text`` frame of ``layer``'s unsent text (empty bytes if none),
        followed by the layer's ``proposer.tokens`` item.

        The counts go with the text they count: a page that shows a lane's text beside its
        "tokens so far" must never show a lane full of text counted at 0, which is what the
        tokens item's own interval allowed when a burst of text arrived (a staircase hands its
        proposers' deltas on in bursts) or the last text was flushed at ``run.done``.
        """
        assert self._pending is not None
        self._last_text_at[layer] = t
        pending = self._pending.pop(layer, None)
        if not pending:
            return b""
        texts = {agent: "".join(pieces) for agent, pieces in pending.items()}
        frame = self._frame(
            {"type": "proposer.text", "layer": layer, "text": texts, "t": _round(t)}
        )
        return frame + self._frame(self._tokens(layer, t))

    def frame(self, event: Event) -> bytes | None:
        """The progress frame(s) for ``event``, or None when it adds nothing worth sending.

        ``aggregator.delta`` is never a progress item: it is the answer itself.
        """
        t = event.t
        if event.type == "proposer.delta":
            layer = event.layer
            chars = self._chars.get(layer)
            if chars is None or event.index >= len(chars):
                self._slot(layer, event.index, event.agent)
                chars = self._chars[layer]
            chars[event.index] += len(event.text)
            out = b""
            if self._pending is not None:
                self._pending.setdefault(layer, {}).setdefault(event.agent, []).append(event.text)
                if t - self._last_text_at.get(layer, 0.0) >= TEXT_INTERVAL:
                    out = self._text(layer, t)  # with the layer's counts
            if not out and t - self._last_tokens_at.get(layer, 0.0) >= TOKENS_INTERVAL:
                out = self._frame(self._tokens(layer, t))
            return out or None
        if event.type == "aggregator.delta":
            return None
        if event.type == "proposer.started":
            self._slot(event.layer, event.index, event.agent)
        elif event.type == "proposer.done":
            self._done_tokens[(event.layer, event.index)] = event.usage.completion_tokens
        held = b""
        if self._pending:
            # Text still held back goes first (and is numbered first): a client must have a
            # proposer's whole text before it reads that the proposer is done, or that the
            # layer went on without it.
            if (
                event.type == "proposer.done"
                or event.type == "proposer.failed"
                or event.type == "layer.done"
            ):
                held = self._text(event.layer, t)
            elif event.type == "run.done":
                held = b"".join(self._text(layer, t) for layer in list(self._pending))
        payload = _payload(event)
        if event.type == "layer.done":
            payload["references"] = [
                self._reference_tokens(event.layer, r) for r in event.references
            ]
        return held + self._frame(payload)
