"""Shared pieces of the real-inference tests: requests, a running ``moa-stream serve``."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from moa_stream import ChatMessage, ChatRequest, Delta, OpenAIProvider, RetryPolicy, Timeouts
from moa_stream.testing.llamacpp import InferenceServer

MODEL = "smollm2"

QUESTION: list[ChatMessage] = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
]

#: A prompt of roughly 1,300 tokens: over any 256- or 512-token context used here.
OVERFLOW: list[ChatMessage] = [
    {"role": "user", "content": "Describe the sky at noon and at dusk. " * 130}
]

#: Generous limits: on two busy cores the first token of a 135M model can take seconds.
TIMEOUTS = Timeouts(connect=10, first_token=60, idle=60, total=240)


def chat_request(
    messages: list[ChatMessage] | None = None, *, max_tokens: int = 24, **extra: Any
) -> ChatRequest:
    """A deterministic request (temperature 0, fixed seed) for the real servers."""
    return ChatRequest(
        messages=messages if messages is not None else QUESTION,
        model=MODEL,
        temperature=0.0,
        max_tokens=max_tokens,
        extra={"seed": 7, **extra},
    )


def provider(base_url: str, *, attempts: int = 2) -> OpenAIProvider:
    """A provider for ``base_url``. Two attempts, because llama-server closes the connection
    after each streamed response while announcing keep-alive: a request sent right after one
    meets the closed pooled connection and is sent again at once (only a retry can do that)."""
    return OpenAIProvider(
        base_url,
        timeouts=TIMEOUTS,
        retry=RetryPolicy(max_attempts=attempts, backoff_base=0.01, backoff_cap=0.05),
    )


async def collect(prov: OpenAIProvider, req: ChatRequest) -> tuple[list[Delta], Any]:
    """Every delta of one stream, and the stream (for its usage, timings, finish reason)."""
    async with prov.stream(req) as stream:
        deltas = [delta async for delta in stream]
    return deltas, stream


async def drain(stream: Any) -> None:
    """Open ``stream`` and read it to its end."""
    async with stream:
        async for _ in stream:
            pass


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.content for d in deltas)


async def wait_for_log(server: InferenceServer, needle: str, after: int, within: float) -> float:
    """Seconds until ``needle`` appears in the server's log past its first ``after``
    characters; AssertionError after ``within`` seconds."""
    started = time.monotonic()
    while True:
        log = server.log_text()
        if needle in log[after:]:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{needle!r} not in the log after {within} s:\n{log[-3000:]}")
        await asyncio.sleep(0.05)


def raw_session() -> aiohttp.ClientSession:
    """A plain aiohttp session for requests the tests make by hand. No keep-alive: llama-server
    closes the connection after a streamed response although it announces keep-alive."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


@dataclass
class Serve:
    """A ``moa-stream serve`` process on a free port."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far."""
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(raw))
        return lines


@contextlib.contextmanager
def moa_serve(config: str, *, timeout: float = 60.0) -> Iterator[Serve]:
    """Run ``moa-stream serve --config <config> --port 0`` and yield once it listens."""
    with tempfile.TemporaryDirectory(prefix="moa-serve-") as tmp:
        config_path = Path(tmp) / "moa.toml"
        config_path.write_text(config)
        log_path = Path(tmp) / "serve.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "moa_stream.cli", "serve"),
                    *("--config", str(config_path), "--port", "0", "--log-level", "debug"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            serve = Serve("", process, log_path)
            deadline = time.monotonic() + timeout
            while not serve.url:
                for line in serve.log_lines():
                    if line.get("event") == "server.listening":
                        serve.url = str(line["url"])
                if process.poll() is not None:
                    raise AssertionError(f"moa-stream serve exited: {log_path.read_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"moa-stream serve did not listen: {log_path.read_text()}")
                time.sleep(0.05)
            yield serve
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def moa_config(
    providers: Mapping[str, str],
    agents: Mapping[str, tuple[str, int]],
    moas: str,
    *,
    provider_lines: str = "",
) -> str:
    """A config TOML: ``providers`` name -> base URL; ``agents`` name -> (provider,
    max_tokens); ``moas`` the ``[moa.*]`` tables as written; ``provider_lines`` added to every
    provider's table."""
    parts = []
    for name, url in providers.items():
        parts.append(
            f'[providers.{name}]\nbase_url = "{url}"\n'
            "timeouts = { connect = 5, first_token = 60, idle = 60, total = 240 }\n"
            f"retry = {{ max_attempts = 2 }}\n{provider_lines}"
        )
    for name, (prov, max_tokens) in agents.items():
        parts.append(
            f'[agents.{name}]\nprovider = "{prov}"\nmodel = "{MODEL}"\n'
            f"temperature = 0.0\nmax_tokens = {max_tokens}\n"
        )
    parts.append(moas)
    return "\n".join(parts)


async def progress_stream(
    url: str, model: str, on_item: Any, messages: list[ChatMessage] | None = None
) -> tuple[int, str, list[dict[str, Any]], list[dict[str, Any]]]:
    """POST a streamed request with progress on, calling ``on_item`` for each progress item
    (and with ``{"type": "content"}`` for each answer token); the status, the answer text, the
    progress items and any error frames."""
    body = {
        "model": model,
        "messages": messages or QUESTION,
        "stream": True,
        "temperature": 0,
    }
    items: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    text = []
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session,
        session.post(
            f"{url}/v1/chat/completions", json=body, headers={"X-MoA-Progress": "1"}
        ) as resp,
    ):
        if resp.status != 200:
            return resp.status, (await resp.text()), items, errors
        async for line in resp.content:
            if line.startswith(b": moa.progress "):
                item = orjson.loads(line[len(b": moa.progress ") :])
                items.append(item)
                on_item(item)
            elif line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunk = orjson.loads(line[len(b"data: ") :])
                if "error" in chunk:
                    errors.append(chunk["error"])
                elif chunk.get("choices"):
                    content = chunk["choices"][0]["delta"].get("content") or ""
                    text.append(content)
                    if content:
                        on_item({"type": "content", "content": content})
    return 200, "".join(text), items, errors
