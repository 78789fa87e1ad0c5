"""The playground page: a MoA run drawn lane by lane in the browser, served at ``/``.

The page is three static files in this package (``index.html``, ``app.js``, ``style.css``, plus
an icon) with no build step and nothing fetched from elsewhere. It talks to the server only
through the public API (``GET /v1/models`` and ``POST /v1/chat/completions`` streamed with
``X-MoA-Progress: text``), so whatever it shows, any client could show. ``[server] ui = false``
or ``moa-stream serve --no-ui`` leaves it out; ``docs/server.md`` describes it.

The files are read once, when the routes are added, and answered from memory with an ``ETag``,
so a page reload costs a 304. A strict ``Content-Security-Policy`` keeps the page to its own
origin: it can load nothing and call nothing elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

_ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

__all__ = ["FILES", "add_playground_routes"]

#: The files under ``/playground/`` and their content types; ``index.html`` is also ``/``.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (a 304 with the ETag): an upgraded server never serves a stale page.
    "Cache-Control": "no-cache",
}


class _StaticFile:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str) -> None:
        self.body = resources.files(__name__).joinpath(name).read_bytes()
        self.content_type = FILES[name]
        self.etag = '"' + hashlib.blake2b(self.body, digest_size=12).hexdigest() + '"'

    async def handle(self, request: web.Request) -> web.Response:
        headers = {**_HEADERS, "ETag": self.etag, "Content-Type": self.content_type}
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers=headers)


def add_playground_routes(
    router: web.UrlDispatcher, *, expect_handler: _ExpectHandler | None = None
) -> None:
    """Serve the playground at ``/`` and its files under ``/playground/``.

    ``expect_handler`` is the server's, so that the page's routes refuse an unmet ``Expect``
    the way the API's do.
    """
    files = {name: _StaticFile(name) for name in FILES}
    router.add_get("/", files["index.html"].handle, expect_handler=expect_handler)
    for name, static in files.items():
        router.add_get(f"/playground/{name}", static.handle, expect_handler=expect_handler)
