"""The provider's own usage estimate, and keys masked in error frames of a 200 stream."""

from __future__ import annotations

import pytest
from support.providers import DONE, chunk, collect, provider_for, raw_server, request, serve_bytes

from moa_stream import UpstreamError, estimate_tokens
from moa_stream.providers import RetrySettings
from moa_stream.providers._chunks import MAX_ERROR_CHARS


async def test_estimated_completion_tokens_count_characters_not_chunks() -> None:
    # Three chunks of very different sizes and no usage chunk: the estimate follows the text.
    pieces = ["A" * 400, "b", "c" * 37]
    reasoning = "r" * 120
    body = (
        chunk("", role="assistant")
        + chunk(reasoning=reasoning)
        + b"".join(chunk(p) for p in pieces)
        + chunk(finish="stop")
        + DONE
    )
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
        usage = stream.usage
    assert text == "".join(pieces)
    assert usage is not None
    assert usage.estimated
    assert usage.completion_tokens == estimate_tokens(len(text) + len(reasoning))


async def test_error_frame_masks_the_key_before_cutting_it() -> None:
    key = "sk-live-0123456789abcdefghijklmnopqrstuv"
    # A plain-text error event (llama.cpp's old form), long enough that the key straddles the
    # length limit with only a few of its characters before the cut: too few for prefix
    # masking to catch once the text is cut.
    filler = "x" * (MAX_ERROR_CHARS - 5)
    frame = f"event: error\ndata: {filler}{key} was rejected\n\n".encode()
    body = chunk("", role="assistant") + frame

    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server, api_key=key, retry=RetrySettings(max_attempts=1)) as provider,
    ):
        with pytest.raises(UpstreamError) as info:
            await collect(provider)
    message = str(info.value.message)
    assert len(message) <= MAX_ERROR_CHARS
    assert key[:5] not in message
    assert message.startswith(filler + "***")
