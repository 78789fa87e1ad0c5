"""How real servers answer a prompt longer than the model's context window.

Three forms, byte for byte the shape each server sends (the simulator's fault
``context_overflow``, and what a model with a ``context_window`` does with a longer prompt):

* ``openai``: OpenAI and vLLM, HTTP 400 with ``code: "context_length_exceeded"`` and the
  "maximum context length" sentence (they count the prompt plus ``max_tokens``: a prompt that
  fits with too little room left gets the "you requested" form of the sentence);
* ``llama-server``: llama.cpp's own server, HTTP 400 with ``type: "exceed_context_size_error"``,
  ``n_prompt_tokens`` and ``n_ctx``;
* ``llama-cpp-python``: its server, streamed, answers HTTP 200 with an event-stream content
  type and no body at all (its log says "Requested tokens (N) exceed context window of W");
  not streamed, HTTP 400 with that sentence.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from moa_stream.sim._ledger import SimRecord
from moa_stream.sim._plan import ParsedRequest
from moa_stream.sim._wire import json_response
from moa_stream.sim.profiles import SimModel

__all__ = ["overflow_response"]


def _json(status: int, body: object, request_id: str) -> web.Response:
    return json_response(orjson.dumps(body), status, request_id)


async def overflow_response(
    request: web.Request,
    record: SimRecord,
    model: SimModel,
    req: ParsedRequest,
    prompt_tokens: int,
) -> web.StreamResponse:
    """The response of ``model``'s server to a prompt of ``prompt_tokens`` that does not fit."""
    resp = await _overflow(
        request, model, prompt_tokens, req.max_tokens, req.stream, record.request_id
    )
    record.status = resp.status
    return resp


async def _overflow(
    request: web.Request,
    model: SimModel,
    prompt_tokens: int,
    max_tokens: int | None,
    stream: bool,
    request_id: str,
) -> web.StreamResponse:
    window = model.context_window or max(1, prompt_tokens // 2)
    if model.overflow == "llama-server":
        return _json(
            400,
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": prompt_tokens,
                    "n_ctx": window,
                }
            },
            request_id,
        )
    if model.overflow == "llama-cpp-python":
        if stream:
            resp = web.StreamResponse(
                status=200,
                headers={"Content-Type": "text/event-stream", "x-request-id": request_id},
            )
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        message = f"Requested tokens ({prompt_tokens}) exceed context window of {window}"
    elif model.context_window is not None and prompt_tokens <= window and max_tokens:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} "
            "in the completion). Please reduce the length of the messages or completion."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
    return _json(
        400,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
        request_id,
    )
