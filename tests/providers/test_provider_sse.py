"""The SSE decoder: every framing quirk, and any split of the bytes gives the same events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_stream.providers import SSEDecoder, SSEEvent


def decode(*pieces: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events + decoder.finish()


def bytewise(data: bytes) -> list[SSEEvent]:
    return decode(*(data[i : i + 1] for i in range(len(data))))


def msg(data: str, event: str = "message", id: str | None = None) -> SSEEvent:
    return SSEEvent(event, data, id)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"data: a\n\n", [msg("a")], id="lf"),
        pytest.param(b"data: a\r\n\r\n", [msg("a")], id="crlf"),
        pytest.param(b"data: a\r\rdata: b\r\r", [msg("a"), msg("b")], id="cr-only"),
        pytest.param(b"data: a\r\n\ndata: b\n\r\n", [msg("a"), msg("b")], id="mixed-endings"),
        pytest.param(b"data: a\ndata: b\n\n", [msg("a\nb")], id="multi-line-data"),
        pytest.param(b"data:a\n\n", [msg("a")], id="no-space-after-colon"),
        pytest.param(b"data:  a\n\n", [msg(" a")], id="only-one-space-stripped"),
        pytest.param(b"data\n\n", [msg("")], id="field-without-colon"),
        pytest.param(b"data:\n\n", [msg("")], id="empty-data"),
        pytest.param(b"data: a\n\n\n\ndata: b\n\n", [msg("a"), msg("b")], id="extra-blank-lines"),
        pytest.param(b": keep-alive\n\n", [], id="comment-only"),
        pytest.param(
            b": OPENROUTER PROCESSING\n\ndata: a\n: mid\n\n", [msg("a")], id="comments-ignored"
        ),
        pytest.param(b"foo: bar\ndata: a\nbaz\n\n", [msg("a")], id="unknown-fields-ignored"),
        pytest.param(b"event: ping\n\n", [], id="no-data-no-event"),
        pytest.param(b"event: delta\ndata: a\n\n", [msg("a", "delta")], id="event-type"),
        pytest.param(b"event:\ndata: a\n\n", [msg("a")], id="empty-event-type"),
        pytest.param(
            b"id: 7\ndata: a\n\ndata: b\n\n", [msg("a", id="7"), msg("b", id="7")], id="id-persists"
        ),
        pytest.param(b"id: a\x00b\ndata: x\n\n", [msg("x")], id="id-with-nul-ignored"),
        pytest.param(
            b"retry: 1500\ndata: a\n\n", [SSEEvent("message", "a", None, 1500)], id="retry"
        ),
        pytest.param(b"retry: soon\ndata: a\n\n", [msg("a")], id="invalid-retry-ignored"),
        pytest.param(b'error: {"message":"x"}\n\n', [msg('{"message":"x"}', "error")], id="error"),
        pytest.param(b"\xef\xbb\xbfdata: a\n\n", [msg("a")], id="bom-at-start"),
        pytest.param(b"data: [DONE]", [msg("[DONE]")], id="last-event-without-blank-line"),
        pytest.param(b"data: [DONE]\n", [msg("[DONE]")], id="last-event-with-one-newline"),
        pytest.param(b"data: caf\xc3\xa9\n\n", [msg("café")], id="utf8"),
        pytest.param(b"data: \xff\n\n", [msg("\ufffd")], id="invalid-utf8-replaced"),
        pytest.param(b"", [], id="empty"),
    ],
)
def test_quirk(raw: bytes, expected: list[SSEEvent]) -> None:
    assert decode(raw) == expected
    assert bytewise(raw) == expected


def test_bom_later_in_the_stream_is_kept() -> None:
    # Only a mark at the very start of the body is dropped; later it is part of a field name.
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [msg("a")]


def test_bom_split_over_pieces() -> None:
    assert decode(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [msg("a")]
    assert decode(b"\xef\xbb") == []


def test_crlf_split_between_pieces_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == [msg("a")]
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [msg("b")]


def test_blank_line_split_between_pieces() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [msg("a")]


def test_multibyte_character_split_at_every_offset() -> None:
    raw = "data: 日本語 ✓ 🚀\n\n".encode()
    for cut in range(len(raw) + 1):
        assert decode(raw[:cut], raw[cut:]) == [msg("日本語 ✓ 🚀")]


def test_events_come_out_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == [msg("a")]
    assert decoder.feed(b"\n\n") == [msg("b")]
    assert decoder.finish() == []


def test_large_event_in_many_small_pieces() -> None:
    payload = "x" * 300_000  # larger than aiohttp's readline limit
    raw = f"data: {payload}\n\n".encode()
    pieces = [raw[i : i + 1000] for i in range(0, len(raw), 1000)]
    assert decode(*pieces) == [msg(payload)]


def test_feed_data_returns_plain_strings_for_default_events() -> None:
    decoder = SSEDecoder()
    out = decoder.feed_data(b"data: a\n\nevent: x\ndata: b\n\ndata: c\n\n")
    assert out == ["a", SSEEvent("x", "b"), "c"]


def test_feed_data_keeps_the_id_when_one_was_set() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_data(b"id: 1\ndata: a\n\ndata: b\n\n") == [
        SSEEvent("message", "a", "1"),
        SSEEvent("message", "b", "1"),
    ]


def test_finish_resets_the_decoder() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a")
    assert decoder.finish() == [msg("a", id="1")]
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [msg("b")]


# -- property: any split of a valid stream gives the same events -------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00"),
    max_size=12,
)
_field_text = _text.filter(lambda s: ":" not in s)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A valid event stream in a random line-ending style, and the events it holds."""
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    out: list[str] = []
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for _ in range(draw(st.integers(0, 6))):
        lines: list[str] = []
        if draw(st.booleans()):
            lines.append(":" + draw(_text))
        event_type = draw(st.none() | _field_text.filter(bool))
        if event_type is not None:
            lines.append(f"event: {event_type}")
        if draw(st.booleans()):
            last_id = draw(_text)
            lines.append(f"id: {last_id}")
        retry = draw(st.none() | st.integers(0, 10_000))
        if retry is not None:
            lines.append(f"retry: {retry}")
        data_lines = draw(st.lists(_text, min_size=1, max_size=3))
        lines += [f"data: {d}" for d in data_lines]
        if draw(st.booleans()):
            lines.append("unknown: field")
        out.append(ending.join(lines) + ending + ending)
        expected.append(SSEEvent(event_type or "message", "\n".join(data_lines), last_id, retry))
    raw = "".join(out).encode()
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw, expected


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_gives_the_same_events(
    stream: tuple[bytes, list[SSEEvent]], cuts: list[int]
) -> None:
    raw, expected = stream
    offsets = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *offsets], [*offsets, len(raw)], strict=True)]
    assert decode(raw) == expected
    assert decode(*pieces) == expected


@settings(max_examples=50, deadline=None)
@given(streams())
def test_byte_by_byte_gives_the_same_events(stream: tuple[bytes, list[SSEEvent]]) -> None:
    raw, expected = stream
    assert bytewise(raw) == expected


# One-line data events (the shape of almost every chunk of an LLM stream, decoded on a faster
# path) mixed with what breaks a run of them: blank lines, comments, data without the space,
# multi-line data and an id that every later event must carry.
_RUN_PARTS: list[tuple[str, list[tuple[str, str | None]]]] = [
    ('data: {"a": 1}\n\n', [('{"a": 1}', None)]),
    ("data: x\n\n", [("x", None)]),
    ("data: \n\n", [("", None)]),
    ("data:y\n\n", [("y", None)]),
    ("data: caf\u00e9\n\n", [("caf\u00e9", None)]),
    ("\n", []),
    (": keep-alive\n\n", []),
    ("data: a\ndata: b\n\n", [("a\nb", None)]),
    ("data: c\n: mid\n\n", [("c", None)]),
    ("id: 9\ndata: d\n\n", [("d", "9")]),
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(_RUN_PARTS) - 1), max_size=12),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_runs_of_data_events_in_any_split(parts: list[int], cuts: list[int]) -> None:
    raw = "".join(_RUN_PARTS[i][0] for i in parts).encode()
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for i in parts:
        for data, event_id in _RUN_PARTS[i][1]:
            last_id = event_id or last_id
            expected.append(msg(data, id=last_id))
    offsets = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *offsets], [*offsets, len(raw)], strict=True)]
    assert decode(raw) == expected
    assert decode(*pieces) == expected
    assert bytewise(raw) == expected
