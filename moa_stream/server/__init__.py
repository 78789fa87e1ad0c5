"""The OpenAI-compatible MoA server (``moa-stream serve``).

Every ``[moa.<id>]`` of a config is a model: ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``GET /healthz``, ``GET /metrics``, and the playground page at ``GET /``
(:mod:`moa_stream.server.playground`). See ``docs/server.md``.

::

    from moa_stream.config import Runtime, load_config
    from moa_stream.server import create_app

    async with Runtime(load_config("moa.toml")) as runtime:
        app = create_app(runtime)   # an aiohttp Application; or: await serve(config)

The names below are imported from their modules when first used, not with the package: the
app integrations use the server's error mapping and response writer
(:mod:`~moa_stream.server.errors`, :mod:`~moa_stream.server.respond`), and importing those
must not load the server's application (:mod:`~moa_stream.server.app`) as well.
"""

# No other names at module level: the package's namespace is its public names (``__all__``).
import importlib
import typing

if typing.TYPE_CHECKING:
    from moa_stream._wire import ChatCompletionRequest, ChunkEncoder, parse_chat_request
    from moa_stream.server._serve import serve
    from moa_stream.server.app import MoAServer, create_app
    from moa_stream.server.errors import APIError
    from moa_stream.server.logs import configure_logging
    from moa_stream.server.metrics import ServerMetrics
    from moa_stream.server.progress import ProgressEncoder
    from moa_stream.server.respond import PROGRESS_HEADER

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

#: Each public name and the module that defines it.
_HOMES = {
    "APIError": "moa_stream.server.errors",
    "ChatCompletionRequest": "moa_stream._wire",
    "ChunkEncoder": "moa_stream._wire",
    "MoAServer": "moa_stream.server.app",
    "PROGRESS_HEADER": "moa_stream.server.respond",
    "ProgressEncoder": "moa_stream.server.progress",
    "ServerMetrics": "moa_stream.server.metrics",
    "configure_logging": "moa_stream.server.logs",
    "create_app": "moa_stream.server.app",
    "parse_chat_request": "moa_stream._wire",
    "serve": "moa_stream.server._serve",
}


def __getattr__(name: str) -> typing.Any:
    """A public name, imported from its module on first use and kept here after."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
