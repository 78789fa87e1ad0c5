"""The simulator's Anthropic Messages route, ``POST /v1/messages``.

The same models, plans, faults and records as the chat-completions route; only the wire differs.
A Messages body is checked for what the API requires (``model``, ``max_tokens``, ``messages``),
turned into the chat-completions form (``system`` first, as a system message) and planned by
:func:`~moa_stream.sim._plan.build_plan`; the reply goes out as Anthropic's named events:
``message_start``, ``content_block_start``, ``ping``, ``content_block_delta`` ...,
``content_block_stop``, ``message_delta`` (stop reason, output tokens), ``message_stop``. A
request with ``"thinking": {"type": "enabled", ...}`` first gets a thinking block of a few words.

Faults, in Anthropic's terms: ``rate_limit`` is a 429 ``rate_limit_error`` with ``retry-after``,
``server_error`` a 529 ``overloaded_error``, ``error_frame`` an ``event: error`` with
``overloaded_error`` after some text, ``context_overflow`` a 400 "prompt is too long",
``keepalive`` extra ``ping`` events; stalls, resets and malformed data as on the other route.

A final assistant message is continued (a prefill), as the API does, with the model's
continuation flaws; a model that refuses prefills answers as Anthropic's newer models do, a 400
``invalid_request_error`` "This model does not support assistant message prefill. ...".

Only the wire is here: the plan of every reply and what is kept of it are the ledger's
(:mod:`moa_stream.sim._ledger`), when each piece goes out the pacer's
(:mod:`moa_stream.sim._pacing`), as on the chat-completions route.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from moa_stream._types import content_text
from moa_stream.sim._continue import detect_continuation
from moa_stream.sim._flaws import PREFILL_REFUSAL
from moa_stream.sim._ledger import Ledger, SimRecord, note_done
from moa_stream.sim._pacing import Pacer, event_stream, sleep_until
from moa_stream.sim._plan import ParsedRequest, Plan, RequestError, parse_request
from moa_stream.sim._wire import json_response
from moa_stream.sim.profiles import SimModel

if TYPE_CHECKING:
    from moa_stream.sim.server import SimServer

__all__ = ["MessagesRoute"]

_STOP_REASONS: Final = {"stop": "end_turn", "length": "max_tokens"}
_PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def _json(
    status: int, body: bytes, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(body, status, request_id, headers, id_header="request-id")


def _text(content: object, where: str) -> str:
    if not isinstance(content, str | list):
        raise RequestError(
            400, f"{where}: Input should be a valid string or list of content blocks"
        )
    return content_text(content)


def parse_messages_request(raw: bytes) -> tuple[ParsedRequest, bool]:
    """A Messages body as the chat-completions request the planner takes, and whether it asks
    for thinking. Raises :class:`RequestError` for what the API would refuse."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError(400, "Request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object.")
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            raise RequestError(400, f"{field}: Field required")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: at least one message is required")
    converted: list[dict[str, str]] = []
    if "system" in body:
        converted.append({"role": "system", "content": _text(body["system"], "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RequestError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        converted.append(
            {"role": message["role"], "content": _text(message.get("content"), f"messages.{i}")}
        )
    openai_body: dict[str, Any] = {
        "model": body["model"],
        "messages": converted,
        "max_tokens": body["max_tokens"],
        "stream": body.get("stream", False),
    }
    for ours, theirs in (("stop", "stop_sequences"), ("sim", "sim")):
        if theirs in body:
            openai_body[ours] = body[theirs]
    thinking = body.get("thinking")
    wants_thinking = isinstance(thinking, dict) and thinking.get("type") == "enabled"
    try:
        return parse_request(orjson.dumps(openai_body)), wants_thinking
    except RequestError as exc:
        raise RequestError(400, f"{exc.param or 'request'}: {exc.message}") from None


def _thinking_words(thinking: bool) -> list[str]:
    return ["Let ", "me ", "think. "] if thinking else []


def _usage(plan: Plan, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": plan.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _block_start(index: int, block: dict[str, str]) -> bytes:
    return _event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: dict[str, str]) -> bytes:
    return _event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


class _MessageEvents:
    """One reply's Messages events, for :meth:`Pacer.stream`: ``message_start`` when generation
    starts; the thinking block (if asked for) and the text block's start with the first tokens;
    a ``content_block_delta`` per token; the block's stop, ``message_delta`` and
    ``message_stop`` at the end."""

    __slots__ = (
        "_index",
        "_output_tokens",
        "_stop_reason",
        "head",
        "keepalive",
        "opening",
        "started",
    )

    def __init__(self, req: ParsedRequest, plan: Plan, message_id: str, thinking: bool) -> None:
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(plan, 1),
        }
        self.opening = b""
        self.started = _event("message_start", {"type": "message_start", "message": message}) + (
            _PING if plan.keepalive else b""
        )
        self.keepalive = _PING
        head: list[bytes] = []
        words = _thinking_words(thinking)
        if words:
            head.append(_block_start(0, {"type": "thinking", "thinking": "", "signature": ""}))
            head.extend(_block_delta(0, {"type": "thinking_delta", "thinking": w}) for w in words)
            head.append(_block_delta(0, {"type": "signature_delta", "signature": "sim"}))
            head.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        self._index = 1 if words else 0
        head.append(_block_start(self._index, {"type": "text", "text": ""}))
        head.append(_PING)
        self.head: Sequence[bytes] = head
        self._stop_reason = _STOP_REASONS.get(plan.finish_reason, plan.finish_reason)
        self._output_tokens = len(plan.tokens) + len(words)

    def tokens(self, tokens: Sequence[str], first: bool, now: float) -> list[bytes]:
        index = self._index
        return [_block_delta(index, {"type": "text_delta", "text": t}) for t in tokens]

    def tail(self, first: bool, now: float) -> list[bytes]:
        return [
            _event("content_block_stop", {"type": "content_block_stop", "index": self._index}),
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": self._output_tokens},
                },
            ),
            _event("message_stop", {"type": "message_stop"}),
        ]

    def error(self) -> bytes:
        return _event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )

    def malformed(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_bl\n\n'


class MessagesRoute:
    """``POST /v1/messages`` of ``sim``, writing into its ``ledger`` on its ``pacer``'s clock."""

    def __init__(self, sim: SimServer, ledger: Ledger, pacer: Pacer) -> None:
        self._sim = sim
        self._ledger = ledger
        self._pacer = pacer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self._ledger.track(request, self._serve, "req_" + secrets.token_hex(12))

    async def _serve(self, request: web.Request, record: SimRecord) -> web.StreamResponse:
        rid = record.request_id
        try:
            req, thinking = parse_messages_request(await request.read())
            record.model = req.model
            record.stream = req.stream
            model = self._sim.models.get(req.model)
            if model is None:
                raise RequestError(404, f"model: {req.model}", error_type="not_found_error")
        except RequestError as exc:
            record.outcome = "error"
            record.status = exc.status
            error_type = exc.error_type
            if error_type != "not_found_error":
                error_type = "invalid_request_error"
            return _json(exc.status, _error_body(error_type, exc.message), rid)

        # The Messages API always continues a final assistant message.
        continuation = detect_continuation(
            req.messages,
            continue_final_message=False,
            last_prefix=False,
            continue_trailing_assistant=True,
        )
        plan = self._ledger.plan(record, model, req, seed=self._sim.seed, continuation=continuation)
        refusal = self._refusal(record, model, req, plan)
        if refusal is not None:
            return refusal
        message_id = "msg_" + secrets.token_hex(12)
        if req.stream:
            events = _MessageEvents(req, plan, message_id, thinking)
            with self._ledger.streaming():
                resp = event_stream("request-id", rid)
                return await self._pacer.stream(request, resp, record, model, plan, events)
        return await self._complete(record, model, req, plan, message_id, thinking)

    @staticmethod
    def _refusal(
        record: SimRecord, model: SimModel, req: ParsedRequest, plan: Plan
    ) -> web.Response | None:
        rid = record.request_id
        if plan.refused:
            record.status, record.outcome = 400, "error"
            return _json(400, _error_body("invalid_request_error", PREFILL_REFUSAL), rid)
        if plan.fault == "rate_limit":
            retry = max(0.0, plan.retry_after_s)
            headers = {
                "retry-after": str(math.ceil(retry)),
                "retry-after-ms": str(round(retry * 1000)),
            }
            body = _error_body(
                "rate_limit_error", "Number of requests has exceeded your rate limit."
            )
            record.status, record.outcome = 429, "fault:rate_limit"
            return _json(429, body, rid, headers)
        if plan.fault == "server_error":
            record.status, record.outcome = 529, "fault:server_error"
            return _json(529, _error_body("overloaded_error", "Overloaded"), rid)
        if plan.fault == "context_overflow":
            window = model.context_window or max(1, plan.prompt_tokens // 2)
            prompt = plan.prompt_tokens
            if model.context_window is not None and prompt <= window and req.max_tokens:
                message = (
                    f"input length and `max_tokens` exceed context limit: {prompt} + "
                    f"{req.max_tokens} > {window}, decrease input length or `max_tokens` "
                    "and try again"
                )
            else:
                message = f"prompt is too long: {prompt} tokens > {window} maximum"
            record.status, record.outcome = 400, "fault:context_overflow"
            return _json(400, _error_body("invalid_request_error", message), rid)
        return None

    async def _complete(
        self,
        record: SimRecord,
        model: SimModel,
        req: ParsedRequest,
        plan: Plan,
        message_id: str,
        thinking: bool,
    ) -> web.StreamResponse:
        async with self._pacer.generation(record, model, plan) as start:
            await sleep_until(start + plan.end_offset)
        content: list[dict[str, Any]] = []
        words = _thinking_words(thinking)
        if words:
            content.append({"type": "thinking", "thinking": "".join(words), "signature": "sim"})
        content.append({"type": "text", "text": "".join(plan.tokens)})
        n = len(plan.tokens)
        body = orjson.dumps(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": req.model,
                "content": content,
                "stop_reason": _STOP_REASONS.get(plan.finish_reason, plan.finish_reason),
                "stop_sequence": None,
                "usage": _usage(plan, n),
            }
        )
        now = time.monotonic()
        record.first_token_sent_at = record.last_token_sent_at = now
        record.status = 200
        record.completion_tokens = n
        note_done(record, plan)
        return _json(200, body, record.request_id)
