"""Bearer keys on /v1/*, open health and metrics, and CORS for browser-based chat UIs."""

from __future__ import annotations

import aiohttp
import pytest
from support.requests import CHAT, body
from support.server import config, serving, stream

from moa_stream.config import ServerConfig
from moa_stream.server.app import MoAServer

KEY = "sk-test-key-7d1e"
OTHER = "sk-test-key-second"
ORIGIN = "https://chat.example.org"

INVALID_KEY_ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer sk-wrong", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"],
)
async def test_wrong_or_missing_key_is_401(authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serving(config(api_keys=(KEY, OTHER))) as srv, aiohttp.ClientSession() as session:
        for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/v1/nothing")):
            async with session.request(
                method, srv.url + path, json=body(), headers=headers
            ) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                error = (await resp.json())["error"]
        assert set(error) == INVALID_KEY_ERROR_FIELDS
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_api_key"
        assert error["param"] is None
        assert srv.state.metrics.requests.value("unknown", "unauthorized") == 1


async def test_every_configured_key_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MOA_KEYS", " sk-env-1 , sk-env-2 ,")
    cfg = config(api_keys=(KEY,), api_keys_env="TEST_MOA_KEYS")
    async with serving(cfg) as srv, aiohttp.ClientSession() as session:
        for key in (KEY, "sk-env-1", "sk-env-2"):
            headers = {"Authorization": f"Bearer {key}"}
            async with session.get(srv.url + "/v1/models", headers=headers) as resp:
                assert resp.status == 200
            sse = await stream(session, srv.url, body("single"), headers=headers)
            assert sse.status == 200 and sse.data[-1] == "[DONE]"
        # The scheme name is case-insensitive.
        async with session.get(
            srv.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}
        ) as resp:
            assert resp.status == 200


async def test_health_and_metrics_need_no_key() -> None:
    async with serving(config(api_keys=(KEY,))) as srv, aiohttp.ClientSession() as session:
        for path in ("/healthz", "/metrics"):
            async with session.get(srv.url + path) as resp:
                assert resp.status == 200


def test_key_comparison_without_keys_allows_everything() -> None:
    state = MoAServer({}, ServerConfig())
    assert state.authorized(None)
    assert state.authorized("Bearer anything")


async def test_preflight_allows_authorization_and_content_type() -> None:
    cfg = config(api_keys=(KEY,), cors_origins=(ORIGIN,))
    async with serving(cfg) as srv, aiohttp.ClientSession() as session:
        headers = {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        }
        # No key: browsers never send credentials on a preflight.
        async with session.options(srv.url + CHAT, headers=headers) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert resp.headers["Vary"] == "Origin"
            allowed = {
                h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")
            }
            assert {"authorization", "content-type", "x-stainless-os"} <= allowed
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]

        # The actual request, streamed: the CORS headers are on the streamed response too.
        sse = await stream(
            session,
            srv.url,
            body("single"),
            headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
        )
        assert sse.status == 200
        assert sse.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "X-Request-Id" in sse.headers["Access-Control-Expose-Headers"]

        # An error response carries them as well, so the page can read the message.
        async with session.get(srv.url + "/v1/models", headers={"Origin": ORIGIN}) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_preflight_from_another_origin_is_refused() -> None:
    cfg = config(cors_origins=(ORIGIN,))
    async with serving(cfg) as srv, aiohttp.ClientSession() as session:
        headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        async with session.options(srv.url + CHAT, headers=headers) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with session.get(
            srv.url + "/v1/models", headers={"Origin": "https://evil.example"}
        ) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_wildcard_origin() -> None:
    async with serving(config(cors_origins=("*",))) as srv, aiohttp.ClientSession() as session:
        headers = {"Origin": "https://any.example", "Access-Control-Request-Method": "POST"}
        async with session.options(srv.url + CHAT, headers=headers) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_preflight_without_cors_config_says_how_to_allow_the_origin() -> None:
    """The default config allows no origin: a browser's preflight gets a 403 whose message
    names the flag to use, not a bare 405."""
    async with serving() as srv, aiohttp.ClientSession() as session:
        headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        async with session.options(srv.url + CHAT, headers=headers) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
            error = (await resp.json())["error"]
    assert error["code"] == "cors_origin_not_allowed"
    assert f"--cors-origin {ORIGIN}" in error["message"]


async def test_preflight_lists_each_allowed_header_once_whatever_its_case() -> None:
    async with serving(config(cors_origins=(ORIGIN,))) as srv, aiohttp.ClientSession() as s:
        headers = {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
        }
        async with s.options(srv.url + CHAT, headers=headers) as resp:
            assert resp.status == 204
            allowed = [
                h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")
            ]
    assert sorted(allowed) == sorted(set(allowed))
    assert {"authorization", "content-type", "x-stainless-os", "x-moa-progress"} <= set(allowed)
