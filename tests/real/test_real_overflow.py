"""A prompt longer than the context window, in every form the real servers send it.

- llama-server, streamed or not: HTTP 400, ``type: exceed_context_size_error`` with
  ``n_prompt_tokens`` and ``n_ctx``;
- llama-cpp-python, streamed: HTTP 200 and an empty body (its log names the overflow);
- llama-cpp-python, not streamed: HTTP 400 with a message naming the context window.

Each must become one typed :class:`~moa_stream.ContextLengthError`, sent once and never retried
(the same prompt fails the same way every time).
"""

from __future__ import annotations

import orjson
import pytest
from realhelpers import OVERFLOW, chat_request, drain, provider, raw_session

from moa_stream import ContextLengthError
from moa_stream.providers._errors import status_error
from moa_stream.testing.llamacpp import InferenceServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]


async def _raw(server: InferenceServer, *, stream: bool) -> tuple[int, bytes]:
    body = {"model": "smollm2", "messages": OVERFLOW, "max_tokens": 8, "stream": stream}
    async with (
        raw_session() as session,
        session.post(f"{server.base_url}/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.read()


async def test_llama_server_overflow_is_a_context_length_error(
    llama_small: InferenceServer,
) -> None:
    async with provider(llama_small.base_url, attempts=3) as prov:
        stream = prov.stream(chat_request(OVERFLOW, max_tokens=8))
        with pytest.raises(ContextLengthError) as info:
            await drain(stream)
    # Not retried, although the policy allows three attempts.
    assert stream.timings.attempts == 1
    err = info.value
    assert err.status == 400
    assert err.code == "exceed_context_size_error" or err.error_type == "exceed_context_size_error"
    assert err.context_window == 256
    assert err.prompt_tokens is not None and err.prompt_tokens > 256
    assert err.estimated_prompt_tokens is not None and err.estimated_prompt_tokens > 256
    assert "max_reference_chars" in str(err)


async def test_llama_cpp_python_streamed_overflow_is_a_context_length_error(
    lcpp_small: InferenceServer,
) -> None:
    """Its empty 200 is the overflow, not a truncated stream to retry."""
    status, raw = await _raw(lcpp_small, stream=True)
    assert (status, raw) == (200, b"")  # the form this test is about
    async with provider(lcpp_small.base_url, attempts=3) as prov:
        stream = prov.stream(chat_request(OVERFLOW, max_tokens=8))
        with pytest.raises(ContextLengthError):
            await drain(stream)
    assert stream.timings.attempts == 1


@pytest.mark.parametrize("server_fixture", ["llama_small", "lcpp_small"])
async def test_non_streamed_overflow_body_maps_to_a_context_length_error(
    server_fixture: str, request: pytest.FixtureRequest
) -> None:
    """The non-streamed 400 bodies (what a non-streaming client such as the reference MoA of
    the benchmark gets) are recognised by the same error mapping."""
    server: InferenceServer = request.getfixturevalue(server_fixture)
    status, raw = await _raw(server, stream=False)
    assert status == 400
    orjson.loads(raw)  # a JSON error body
    err = status_error(status, raw, {}, None)
    assert isinstance(err, ContextLengthError)
