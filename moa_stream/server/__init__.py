"""The OpenAI-compatible MoA server (``moa-stream serve``).

Every ``[moa.<id>]`` of a config is a model: ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``GET /healthz``, ``GET /metrics``, and the playground page at ``GET /``
(:mod:`moa_stream.server.playground`). See ``docs/server.md``.

::

    from moa_stream.config import Runtime, load_config
    from moa_stream.server import create_app

    async with Runtime(load_config("moa.toml")) as runtime:
        app = create_app(runtime)   # an aiohttp Application; or: await serve(config)
"""

from moa_stream._wire import ChatCompletionRequest, ChunkEncoder, parse_chat_request
from moa_stream.server._serve import serve
from moa_stream.server.app import PROGRESS_HEADER, MoAServer, create_app
from moa_stream.server.errors import APIError
from moa_stream.server.logs import configure_logging
from moa_stream.server.metrics import ServerMetrics
from moa_stream.server.progress import ProgressEncoder

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChunkEncoder",
    "MoAServer",
    "PROGRESS_HEADER",
    "ProgressEncoder",
    "ServerMetrics",
    "configure_logging",
    "create_app",
    "parse_chat_request",
    "serve",
]
