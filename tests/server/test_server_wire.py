"""The pure parts: request parsing, chunk bytes, progress items, the public surface."""

from __future__ import annotations

import importlib
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moa_stream._types import Usage
from moa_stream._wire import DONE, ChunkEncoder, WireError, parse_chat_request
from moa_stream.engine.events import (
    AggregatorDelta,
    LayerDone,
    LayerReport,
    ProposerDelta,
    ProposerDone,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)
from moa_stream.server.app import truthy_header
from moa_stream.server.progress import PREFIX, TOKENS_INTERVAL, ProgressEncoder
from moa_stream.server.stream import StreamWriter


def parse(payload: dict[str, Any]) -> Any:
    return parse_chat_request(orjson.dumps(payload))


BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_defaults() -> None:
    req = parse(BASE)
    assert req.model == "m"
    assert req.messages == ({"role": "user", "content": "hi"},)
    assert (req.stream, req.include_usage) == (False, False)
    assert (req.temperature, req.max_tokens, req.stop) == (None, None, None)


def test_fields_that_apply() -> None:
    req = parse(
        {
            **BASE,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 1,
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "stop": ["a", "", "b"],
            "moa_stream": {"progress": True},
        }
    )
    assert req.stream and req.include_usage
    assert req.body["moa_stream"] == {"progress": True}, "extensions are left to the server"
    assert req.temperature == 1.0 and isinstance(req.temperature, float)
    assert req.max_tokens == 20  # the current name wins over the deprecated one
    assert req.stop == ("a", "b")


def test_include_usage_only_when_streaming() -> None:
    assert not parse({**BASE, "stream_options": {"include_usage": True}}).include_usage


def test_stop_forms() -> None:
    assert parse({**BASE, "stop": "x"}).stop == ("x",)
    assert parse({**BASE, "stop": ""}).stop is None
    assert parse({**BASE, "stop": []}).stop is None
    assert parse({**BASE, "stop": None}).stop is None


def test_messages_forms() -> None:
    req = parse(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "t1", "name": "calc"},
            ],
        }
    )
    assert req.messages == (
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "name": "calc"},
    )


def test_flag_headers() -> None:
    assert [truthy_header(v) for v in ("1", "true", " Yes ", "on", "0", "", None)] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"model": "m",}', b"\xff\xfe"])
def test_malformed_json(raw: bytes) -> None:
    with pytest.raises(WireError) as exc:
        parse_chat_request(raw)
    assert exc.value.status == 400 and exc.value.code == "invalid_json"


def test_error_body_shape() -> None:
    with pytest.raises(WireError) as exc:
        parse({"model": "m", "messages": [{"role": "user", "content": 1}]})
    assert orjson.loads(exc.value.body()) == {
        "error": {
            "message": "Invalid type for 'messages[0].content': expected a string or an array "
            "of content parts, got a number.",
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": "invalid_type",
        }
    }
    assert exc.value.frame() == b"data: " + exc.value.body() + b"\n\n"


def chunk(raw: bytes) -> Any:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 2, "one line per event"
    return orjson.loads(raw[len(b"data: ") : -2])


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunk_encoder(include_usage: bool) -> None:
    enc = ChunkEncoder("chatcmpl-1", 1700000000, 'm"1', include_usage)
    head = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": 'm"1',
        "system_fingerprint": None,
    }
    usage_null = {"usage": None} if include_usage else {}

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **usage_null,
        }

    assert chunk(enc.role()) == choice({"role": "assistant", "content": ""})
    assert chunk(enc.content('hé\n"x"')) == choice({"content": 'hé\n"x"'})
    assert chunk(enc.finish("length")) == choice({}, "length")
    assert chunk(enc.usage(3, 4)) == {
        **head,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


@given(st.text())
def test_any_token_round_trips(text: str) -> None:
    enc = ChunkEncoder("id", 1, "m", False)
    assert chunk(enc.content(text))["choices"][0]["delta"]["content"] == text


def test_proposer_tokens_are_coalesced() -> None:
    enc = ProgressEncoder()
    started = enc.frame(ProposerStarted(0, 0, "a", 0.0))
    assert started is not None and started.startswith(PREFIX) and started.endswith(b"\n\n")
    enc.frame(ProposerStarted(0, 1, "b", 0.0))
    frames = []
    # 100 tokens over one second: about one item per interval, not one per token.
    for i in range(100):
        frame = enc.frame(ProposerDelta(0, i % 2, "ab"[i % 2], "x", i / 100))
        if frame is not None:
            frames.append(orjson.loads(frame[len(PREFIX) :]))
    assert len(frames) == int(1 / TOKENS_INTERVAL) - 1
    last = frames[-1]
    assert last["type"] == "proposer.tokens" and last["layer"] == 0
    assert set(last["tokens"]) == {"a", "b"} and sum(last["tokens"].values()) <= 100


def test_progress_items_carry_sizes_and_rounded_times_not_texts() -> None:
    enc = ProgressEncoder()

    def item(event: Any) -> dict[str, Any]:
        frame = enc.frame(event)
        assert frame is not None
        return orjson.loads(frame[len(PREFIX) :])

    done = item(ProposerDone(0, 1, "b", "secret answer", "stop", Usage(5, 7), 0.123456789, 1.5))
    assert done == {
        "type": "proposer.done",
        "layer": 0,
        "index": 1,
        "agent": "b",
        "chars": len("secret answer"),
        "finish_reason": "stop",
        "tokens": 7,
        "estimated": False,
        "ttft_s": 0.1235,
        "t": 1.5,
    }
    ref = ReferenceInfo("b", 1, "partial", 40, 10)
    layer = item(LayerDone(0, "partial", (ref,), None, 0.5, 2.0))
    assert layer["reason"] == "partial" and layer["agreement"] == 0.5
    assert len(layer["references"]) == 1 and layer["references"][0]["status"] == "partial"
    assert enc.frame(AggregatorDelta("tok", 2.1)) is None, "the answer is not progress"


@pytest.mark.parametrize("module_name", ["moa_stream.server"])
def test_exports(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        getattr(module, name)  # the package imports each name on first use
    public = {n for n, v in vars(module).items() if not n.startswith("_")}
    public -= {n for n, v in vars(module).items() if type(v).__name__ == "module"}
    assert set(module.__all__) == public
    assert list(module.__all__) == sorted(module.__all__)


def _usage_report(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "text": "hi",
        "aggregator": "agg",
        "ttft_s": 0.1,
        "time_to_quorum_s": 0.05,
        "aggregator_ttft_s": 0.05,
        "total_s": 0.2,
        "usage": Usage(3, 4),
        "layers": (LayerReport(0, "all", 0.05, (ReferenceInfo("a", 0, "complete", 2, 1),)),),
        "agents": (),
        "finish_reason": "stop",
    }
    fields.update(overrides)
    return RunReport(**fields)


def test_stream_writer_bytes_in_order() -> None:
    """The writer alone decides the bytes: role once and first, answer tokens, the tail."""
    enc = ChunkEncoder("id", 1, "m", True)
    writer = StreamWriter(enc, include_usage=True)
    assert not writer.eager
    assert writer.event(ProposerStarted(0, 0, "a", 0.0)) is None, "nothing asked for"
    assert writer.answer("a") == enc.role() + enc.content("a")
    assert writer.answer("b") == enc.content("b")
    tail = writer.done(RunDone(_usage_report(), 0.3))
    assert tail == enc.finish("stop") + enc.usage(3, 4) + DONE

    silent = StreamWriter(enc)
    assert silent.done(RunDone(_usage_report(), 0.3)) == enc.role() + enc.finish("stop") + DONE


def test_stream_writer_reasoning_and_degraded() -> None:
    enc = ChunkEncoder("id", 1, "m", False)
    writer = StreamWriter(enc, reasoning=True)
    assert writer.eager
    first = writer.event(ProposerStarted(0, 0, "a", 0.0))
    assert first == enc.role() + enc.reasoning("a is drafting an answer (layer 1).\n")
    failed_ref = ReferenceInfo("a", 0, "failed", 0, 0)
    layer = writer.event(LayerDone(0, "degraded", (failed_ref,), None, None, 0.1))
    assert layer is not None and b"No proposer answered" in layer
    assert writer.degraded
    assert writer.answer("x") == enc.content("x"), "the role went out with the first thought"
    report = _usage_report(layers=())
    tail = writer.done(RunDone(report, 0.3))
    assert tail.startswith(enc.finish("stop", {"moa_stream": {"degraded": True}}))
