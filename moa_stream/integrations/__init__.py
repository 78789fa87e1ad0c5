"""The MoA endpoints inside an application you already have.

- :mod:`moa_stream.integrations.fastapi`: a FastAPI router and an SSE response (extra
  ``fastapi``).
- :mod:`moa_stream.integrations.aiohttp`: the server as an aiohttp sub-application, and an SSE
  response helper.

Both speak the server's wire format (:mod:`moa_stream._wire`) and cancel a run when its
client disconnects. Only the request parser is imported here (it needs no framework), so that
importing one integration does not need the other's framework. See ``docs/integrations.md``.
"""

from moa_stream._wire import ChatCompletionRequest, WireError, parse_chat_request

__all__ = ["ChatCompletionRequest", "WireError", "parse_chat_request"]
