"""The simulator's OpenAI routes: ``POST /v1/chat/completions``, ``GET /v1/models`` (and one
model by name) and ``GET /health``.

Only the wire is here: parsing a chat-completions body, OpenAI's error bodies, the
``chat.completion`` object and the ``chat.completion.chunk`` events with their ``x_sim`` timing
field. The plan of every reply and what is kept of it are the ledger's
(:mod:`moa_stream.sim._ledger`), when each piece goes out the pacer's
(:mod:`moa_stream.sim._pacing`).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from moa_stream.sim._continue import detect_continuation, render_prompt
from moa_stream.sim._flaws import PREFILL_REFUSAL
from moa_stream.sim._ledger import Ledger, SimRecord, note_done
from moa_stream.sim._overflow import overflow_response
from moa_stream.sim._pacing import Pacer, abort, event_stream, sleep_until
from moa_stream.sim._plan import ParsedRequest, Plan, RequestError, parse_request
from moa_stream.sim._wire import (
    DONE,
    INTERNAL_ERROR,
    KEEPALIVE,
    ChunkEncoder,
    completion_object,
    error_body,
    error_frame,
    json_response,
)
from moa_stream.sim.profiles import SimModel

if TYPE_CHECKING:
    from moa_stream.sim.server import SimServer

__all__ = ["OpenAIRoutes", "add_request_id", "new_id", "openai_errors"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _error_response(exc: RequestError, request_id: str) -> web.Response:
    return json_response(
        error_body(exc.message, exc.error_type, exc.code, exc.param), exc.status, request_id
    )


def _unknown_model(name: str) -> RequestError:
    return RequestError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


@web.middleware
async def openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Unknown routes and methods get OpenAI error bodies too, not aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message, code = f"Unknown request URL: {request.method} {request.path}.", "unknown_url"
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
            code = "method_not_allowed"
        else:
            message, code = exc.reason, None
        body = error_body(message, "invalid_request_error", code)
        return json_response(body, exc.status, new_id("req_"))


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries an ``x-request-id``, as OpenAI's do."""
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = new_id("req_")


def _x_sim(record: SimRecord, first_token_at: float) -> dict[str, Any]:
    """The simulator's timing field: when the reply was due and when it came."""
    return {
        "request_id": record.request_id,
        "received_at": record.received_at,
        "queued_s": record.queued_s,
        "scheduled_first_token_at": record.scheduled_first_token_at,
        "scheduled_ttft_s": record.scheduled_ttft_s,
        "first_token_at": first_token_at,
    }


class _Chunks:
    """One reply's ``chat.completion.chunk`` events, for :meth:`Pacer.stream`. The first
    content chunk (or the finish, when there is no content) carries the ``x_sim`` field."""

    __slots__ = (
        "_after_finish",
        "_encoder",
        "_finish_reason",
        "_record",
        "head",
        "keepalive",
        "opening",
        "started",
    )

    def __init__(
        self, record: SimRecord, req: ParsedRequest, plan: Plan, completion_id: str, created: int
    ) -> None:
        self._encoder = encoder = ChunkEncoder(completion_id, created, req.model, req.include_usage)
        self._record = record
        self._finish_reason = plan.finish_reason
        self._after_finish = DONE
        if req.include_usage:
            usage = encoder.usage(
                plan.prompt_tokens, len(plan.tokens), cached_tokens=plan.cached_tokens
            )
            self._after_finish = usage + DONE
        self.opening = KEEPALIVE if plan.keepalive else b""
        self.started = b""
        self.head: Sequence[bytes] = ()
        self.keepalive = KEEPALIVE

    def tokens(self, tokens: Sequence[str], first: bool, now: float) -> list[bytes]:
        content = self._encoder.content
        if not first:
            return [content(t) for t in tokens]
        timing = {"x_sim": _x_sim(self._record, now)}
        return [
            self._encoder.role(),
            self._encoder.content_with_extra(tokens[0], timing),
            *[content(t) for t in tokens[1:]],
        ]

    def tail(self, first: bool, now: float) -> list[bytes]:
        if not first:
            return [self._encoder.finish(self._finish_reason), self._after_finish]
        # No content at all: the timing field rides on the finish chunk instead.
        timing = {"x_sim": _x_sim(self._record, now)}
        return [
            self._encoder.role(),
            self._encoder.finish(self._finish_reason, timing),
            self._after_finish,
        ]

    def error(self) -> bytes:
        return error_frame()

    def malformed(self) -> bytes:
        return self._encoder.malformed()


class OpenAIRoutes:
    """The OpenAI routes of ``sim``, writing into its ``ledger`` on its ``pacer``'s clock;
    ``created`` is the ``created`` time of its models and completions."""

    def __init__(self, sim: SimServer, ledger: Ledger, pacer: Pacer, created: int) -> None:
        self._sim = sim
        self._ledger = ledger
        self._pacer = pacer
        self._created = created

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._ledger.track(request, self._serve_chat, new_id("req_"))

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``."""
        return json_response(b'{"status":"ok"}', 200, new_id("req_"))

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``."""
        data = [self._model_object(m) for m in self._sim.models.values()]
        return json_response(orjson.dumps({"object": "list", "data": data}), 200, new_id("req_"))

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``."""
        name = request.match_info["model"]
        model = self._sim.models.get(name)
        if model is None:
            return _error_response(_unknown_model(name), new_id("req_"))
        return json_response(orjson.dumps(self._model_object(model)), 200, new_id("req_"))

    def _model_object(self, model: SimModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": self._created,
            "owned_by": model.owned_by,
        }

    async def _serve_chat(self, request: web.Request, record: SimRecord) -> web.StreamResponse:
        rid = record.request_id
        try:
            req = parse_request(await request.read())
            record.model = req.model
            record.stream = req.stream
            model = self._sim.models.get(req.model)
            if model is None:
                raise _unknown_model(req.model)
        except RequestError as exc:
            record.outcome = "error"
            record.status = exc.status
            return _error_response(exc, rid)

        continuation = detect_continuation(
            req.messages,
            continue_final_message=req.continue_final_message,
            last_prefix=req.last_prefix,
            continue_trailing_assistant=model.continue_trailing_assistant,
        )
        cached_chars = 0
        cache = None
        prompt = ""
        if model.prefix_cache:
            cache = self._ledger.prefix_cache(model)
            prompt = render_prompt(req.messages, open_last=continuation.kind == "prefill")
            cached_chars = cache.serve(prompt)
        plan = self._ledger.plan(
            record,
            model,
            req,
            seed=self._sim.seed,
            continuation=continuation,
            cached_chars=cached_chars,
        )

        if plan.refused:
            record.status, record.outcome = 400, "error"
            body = error_body(PREFILL_REFUSAL, "invalid_request_error", None, "messages")
            return json_response(body, 400, rid)
        if plan.fault == "rate_limit":
            return self._refuse(record, 429, plan)
        if plan.fault == "server_error":
            return self._refuse(record, 500, plan)
        if plan.fault == "context_overflow":
            record.outcome = "fault:context_overflow"
            return await overflow_response(request, record, model, req, plan.prompt_tokens)
        if not model.sends_usage:
            req = replace(req, include_usage=False)
        completion_id = new_id("chatcmpl-")
        try:
            if req.stream:
                chunks = _Chunks(record, req, plan, completion_id, self._created)
                with self._ledger.streaming():
                    resp = event_stream("x-request-id", rid)
                    return await self._pacer.stream(request, resp, record, model, plan, chunks)
            return await self._complete(request, record, model, req, plan, completion_id)
        finally:
            if cache is not None and record.completion_tokens:
                # What was generated stays cached after the prompt, as far as it got.
                generated = "".join(plan.tokens[: record.completion_tokens])
                if model.echo_prefill and continuation.kind == "prefill":
                    generated = generated[len(continuation.answer) :]
                cache.add(prompt + generated)

    @staticmethod
    def _refuse(record: SimRecord, status: int, plan: Plan) -> web.Response:
        record.status = status
        record.outcome = f"fault:{plan.fault}"
        if status == 429:
            retry = max(0.0, plan.retry_after_s)
            body = error_body(
                "Rate limit reached for requests. Please try again later.",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
            headers = {
                "Retry-After": str(math.ceil(retry)),
                "retry-after-ms": str(round(retry * 1000)),
            }
            return json_response(body, 429, record.request_id, headers)
        body = error_body(
            "The server had an error while processing your request.", "server_error", None
        )
        return json_response(body, status, record.request_id)

    async def _complete(
        self,
        request: web.Request,
        record: SimRecord,
        model: SimModel,
        req: ParsedRequest,
        plan: Plan,
        completion_id: str,
    ) -> web.StreamResponse:
        async with self._pacer.generation(record, model, plan) as start:
            if plan.fault in ("reset_mid", "error_frame"):
                await sleep_until(start + plan.event_offset(plan.fault_at))
                record.outcome = f"fault:{plan.fault}"
                if plan.fault == "reset_mid":
                    abort(request)
                    # Never reaches the client: the connection is gone.
                    return web.Response(status=500)
                record.status = 500
                return json_response(INTERNAL_ERROR, 500, record.request_id)
            await sleep_until(start + plan.end_offset)
        now = time.monotonic()
        record.first_token_sent_at = record.last_token_sent_at = now
        completion = completion_object(
            completion_id=completion_id,
            created=self._created,
            model=req.model,
            text="".join(plan.tokens),
            finish_reason=plan.finish_reason,
            prompt_tokens=plan.prompt_tokens,
            completion_tokens=len(plan.tokens),
            extra={"x_sim": _x_sim(record, now)},
            cached_tokens=plan.cached_tokens,
        )
        body = orjson.dumps(completion)
        if plan.fault == "malformed":
            body = body[: len(body) // 2]
        record.status = 200
        record.completion_tokens = len(plan.tokens)
        note_done(record, plan)
        return json_response(body, 200, record.request_id)
