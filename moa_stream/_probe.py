"""Checking the upstreams at start: ``serve``, ``chat`` and ``demo`` ask each provider for its
models before the first request.

A wrong ``base_url`` or model name otherwise shows only per request, and sometimes not at all:
a MoA whose proposer names a model its server lacks still answers, from the other proposers,
with the 404 in a log line. So, at start, every OpenAI-compatible provider of the config gets
one ``GET {base_url}/models``, all at once and bounded in time (:data:`PROBE_TIMEOUT`), and each
problem found is one line naming the config field to fix:

- no connection (refused, unknown host, no answer in time): ``providers.NAME.base_url``;
- HTTP 404 for a ``base_url`` without a version segment: the missing ``/v1``;
- HTTP 401/403: the key (``providers.NAME.api_key_env``);
- a model list that lacks an agent's ``model``: ``agents.NAME.model``.

A server without ``/models`` (another 4xx, or a 404 under ``/v1``) is not a problem: there is
nothing to check. llama.cpp's server lists only the model it loaded and answers to any model
name, so its list is not compared. The probe never stops a command unless asked (``--check``).

:func:`hint_for` gives the same advice for an error that a request met later.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

from moa_stream._exceptions import (
    AggregatorError,
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    ModelNotFoundError,
    ProviderError,
)
from moa_stream.config import Config, ProviderConfig

__all__ = [
    "PROBE_TIMEOUT",
    "Problem",
    "check_at_start",
    "hint_for",
    "missing_version",
    "probe",
]

#: Seconds the whole probe may take: a start-up check, not a health check.
PROBE_TIMEOUT = 2.0
#: The largest model list read (bytes): OpenRouter's is a few hundred kilobytes.
_MAX_BODY = 4 << 20
_VERSION = re.compile(r"/v\d+(?:alpha|beta)?\d*/?$")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one provider or agent, said in one line."""

    provider: str
    message: str

    def __str__(self) -> str:
        return self.message


def missing_version(base_url: str | None) -> bool:
    """Whether ``base_url``'s path lacks the ``/v1`` that OpenAI-compatible servers serve
    under (``http://host:8000`` instead of ``http://host:8000/v1``)."""
    if not base_url:
        return False
    return _VERSION.search(urlsplit(base_url).path or "/") is None


def _with_version(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1"


def _headers(p: ProviderConfig) -> dict[str, str]:
    headers = dict(p.headers)
    key = p.api_key or (os.environ.get(p.api_key_env) if p.api_key_env else None)
    if key:
        headers.setdefault("Authorization", f"Bearer {key}")
    return headers


def _served(body: bytes) -> set[str] | None:
    """The model ids of a ``/models`` answer; None when it lists none that can be compared."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    models = [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if not models or any(m.get("owned_by") == "llamacpp" for m in models):
        # llama.cpp's server answers to any model name with the one model it loaded.
        return None
    return {m["id"] for m in models}


def _listed(models: Iterable[str], limit: int = 5) -> str:
    names = sorted(models)
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


async def _probe_one(
    session: aiohttp.ClientSession, config: Config, p: ProviderConfig, within: float
) -> list[Problem]:
    assert p.base_url is not None
    url = p.base_url.rstrip("/") + "/models"
    field = f"providers.{p.name}.base_url"
    try:
        async with session.get(url, headers=_headers(p), allow_redirects=True) as response:
            status = response.status
            body = await response.content.read(_MAX_BODY) if status == 200 else b""
    except TimeoutError:
        return [
            Problem(
                p.name, f"provider {p.name}: no answer from {url} in {within:g} s; check {field}"
            )
        ]
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error) if exc.os_error else str(exc)
        return [
            Problem(
                p.name,
                f"provider {p.name}: cannot connect to {p.base_url} ({reason}); check {field}",
            )
        ]
    except (aiohttp.ClientError, ValueError) as exc:
        return [Problem(p.name, f"provider {p.name}: GET {url} failed ({exc}); check {field}")]
    if status == 404 and missing_version(p.base_url):
        return [
            Problem(
                p.name,
                f"provider {p.name}: GET {url} is HTTP 404; OpenAI-compatible servers serve "
                f'under /v1: did you mean {field} = "{_with_version(p.base_url)}"?',
            )
        ]
    if status in (401, 403):
        where = (
            f"providers.{p.name}.api_key_env ({p.api_key_env})"
            if p.api_key_env
            else f"providers.{p.name}.api_key"
        )
        return [
            Problem(
                p.name, f"provider {p.name}: {url} refused the key (HTTP {status}); check {where}"
            )
        ]
    if status != 200:
        return []  # no model list here: nothing to compare
    served = _served(body)
    if served is None:
        return []
    return [
        Problem(
            p.name,
            f"agent {name}: provider {p.name} does not serve model {agent.model!r} "
            f"(it lists {_listed(served)}); check agents.{name}.model",
        )
        for name, agent in config.agents.items()
        if agent.provider == p.name and agent.model not in served
    ]


async def probe(config: Config, *, within: float = PROBE_TIMEOUT) -> list[Problem]:
    """Ask every OpenAI-compatible provider of ``config`` for its models, all at once, within
    ``within`` seconds; the problems found, at most one per provider or agent."""
    targets = [p for p in config.providers.values() if p.kind == "openai" and p.base_url]
    if not targets:
        return []
    client_timeout = aiohttp.ClientTimeout(total=within)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=True) as session:
        found = await asyncio.gather(*(_probe_one(session, config, p, within) for p in targets))
    return [problem for problems in found for problem in problems]


async def check_at_start(config: Config, command: str, *, fatal: bool) -> bool:
    """The probe of a command's start: each problem one line on stderr (``warning:``, or
    ``error:`` when ``fatal``, as ``--check`` asks); False when ``fatal`` and something is
    wrong."""
    problems = await probe(config)
    word = "error" if fatal else "warning"
    for problem in problems:
        sys.stderr.write(f"moa-stream {command}: {word}: {problem}\n")
    sys.stderr.flush()
    return not (fatal and problems)


def hint_for(exc: BaseException, config: Config) -> str | None:
    """What to check in ``config`` after a request failed with ``exc`` (or an aggregator
    failed with such errors): the field behind a refused connection or a 404; None when the
    error says nothing about the config."""
    errors = list(exc.errors.values()) if isinstance(exc, AggregatorError) else [exc]
    for error in errors:
        if not isinstance(error, ProviderError) or error.provider is None:
            continue
        p = config.providers.get(error.provider)
        if p is None:
            continue
        field = f"providers.{p.name}.base_url"
        if isinstance(error, ConnectError | ConnectTimeout):
            return f"check {field} ({p.base_url})"
        if isinstance(error, ModelNotFoundError):
            if missing_version(p.base_url) and p.base_url:
                return f'did you mean {field} = "{_with_version(p.base_url)}"?'
            agents = [
                n
                for n, a in config.agents.items()
                if a.provider == p.name and (error.model is None or a.model == error.model)
            ]
            fields = ", ".join(f"agents.{n}.model" for n in agents) or field
            return f"check {fields}"
        if isinstance(error, AuthenticationError):
            return f"check providers.{p.name}.api_key_env"
    return None
