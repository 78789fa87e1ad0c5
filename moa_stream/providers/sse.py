"""An incremental Server-Sent Events decoder that does no I/O.

Feed it the raw bytes of a response body in whatever pieces the network delivers them;
it returns the events completed so far. It follows the WHATWG ``text/event-stream`` rules
that matter to LLM streams:

* lines end in LF, CRLF or CR, also when a CRLF pair is split between two pieces;
* several ``data:`` lines in one event are joined with ``\\n``;
* ``:`` lines are comments (keep-alives) and are dropped, unknown fields are ignored;
* one space after the colon is optional and removed;
* a UTF-8 byte order mark at the very start is skipped;
* bytes are decoded only once whole events are in, so a multi-byte character split between
  pieces is fine.

Two deliberate departures from the browser algorithm, both for LLM servers seen in the wild:
:meth:`SSEDecoder.finish` dispatches a last event that was not followed by a blank line (a
``data: [DONE]`` written just before the connection closed), and the non-standard ``error:``
field that old llama.cpp servers send becomes an event whose type is ``"error"``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    ``event`` is the event type (``"message"`` unless the server named one), ``data`` the
    joined data lines, ``id`` the last event id seen on the stream so far, ``retry`` the
    reconnection delay in milliseconds if this event carried a valid one.
    """

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Turns body bytes into :class:`SSEEvent` objects, incrementally.

    >>> d = SSEDecoder()
    >>> d.feed(b"data: hel") + d.feed(b"lo\\r\\n\\r\\n")
    [SSEEvent(event='message', data='hello', id=None, retry=None)]

    One decoder per response; :meth:`finish` at end of body.
    """

    __slots__ = ("_bom_pending", "_cr_pending", "_last_id", "_pending")

    def __init__(self) -> None:
        # Bytes that cannot yet form a complete event. Pieces without a blank line are only
        # appended here, so a large event arriving in many small reads costs linear time.
        self._pending: list[bytes] = []
        # The previous piece ended with CR: an LF at the start of the next one belongs to it.
        self._cr_pending = False
        self._bom_pending = True
        self._last_id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add the next piece of the body; return the events it completed (often none)."""
        return [SSEEvent("message", e) if isinstance(e, str) else e for e in self.feed_data(data)]

    def finish(self) -> list[SSEEvent]:
        """Signal the end of the body; return the last event if it lacked its blank line.

        The decoder is reset and may be reused for a new stream afterwards.
        """
        return [SSEEvent("message", e) if isinstance(e, str) else e for e in self.finish_data()]

    def feed_data(self, data: bytes) -> list[str | SSEEvent]:
        """Like :meth:`feed`, in the cheap form used on the hot path of a provider.

        An event of the default type, with no id and no retry, comes back as its data string
        alone (every chunk of an LLM stream is one); any other event as an :class:`SSEEvent`.
        Skipping an object per event is a large share of the decoding cost.
        """
        if self._bom_pending:
            data = self._strip_bom(data)
            if self._bom_pending:
                return []
        if self._cr_pending and data:
            self._cr_pending = False
            if data[0] == 0x0A:
                data = data[1:]
        if b"\r" in data:
            # Normalising to LF once per piece keeps the event splitting below a single
            # C-level split for every line-ending style.
            self._cr_pending = data[-1] == 0x0D
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._pending
        end = data.rfind(b"\n\n")
        # No blank line in this piece, nor one straddling the previous piece and this one.
        if end < 0 and not (pending and data[:1] == b"\n" and pending[-1][-1:] == b"\n"):
            if data:
                pending.append(data)
            return []
        if pending:
            pending.append(data)
            data = b"".join(pending)
            pending.clear()
            end = data.rfind(b"\n\n")
        if end + 2 < len(data):
            pending.append(data[end + 2 :])
        # Events never split a multi-byte character (LF is never part of one), so the complete
        # events of this piece decode in one call, and the rest is done on text.
        text = data[:end].decode("utf-8", "replace")
        if not text.startswith("data: "):
            return self._decode_blocks(text, [])
        # The common case, a run of one-line ``data: {...}`` events: split where an event ends
        # and the next one's ``data: `` starts, which leaves each event's data alone, with no
        # copy per event. A piece holding a line break is an event of any other shape, or
        # several events (a comment after a data event ...): those take the general way.
        events: list[str | SSEEvent] = []
        append = events.append
        no_id = self._last_id is None
        for piece in text[6:].split("\n\ndata: "):
            if no_id and "\n" not in piece:
                append(piece)
            else:
                self._decode_blocks("data: " + piece, events)
                no_id = self._last_id is None
        return events

    def _decode_blocks(self, text: str, events: list[str | SSEEvent]) -> list[str | SSEEvent]:
        """Append the events of ``text``, whole events separated by blank lines."""
        for block in text.split("\n\n"):
            # The common case, one ``data: {...}`` line, costs a prefix test and a search.
            if block.startswith("data: ") and "\n" not in block and self._last_id is None:
                events.append(block[6:])
            elif block:
                event = self._decode_block(block)
                if event is not None:
                    events.append(event)
        return events

    def finish_data(self) -> list[str | SSEEvent]:
        """Like :meth:`finish`, in the form of :meth:`feed_data`."""
        data = b"".join(self._pending)
        if self._bom_pending and data.startswith(_BOM):
            data = data[3:]
        self._pending.clear()
        self._cr_pending = False
        self._bom_pending = True
        text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode("utf-8", "replace")
        events: list[str | SSEEvent] = []
        for block in text.split("\n\n"):
            if block:
                event = self._decode_block(block)
                if event is not None:
                    events.append(event)
        self._last_id = None
        return events

    def _strip_bom(self, data: bytes) -> bytes:
        # The mark may itself arrive split over pieces: hold back a prefix of it.
        if self._pending:
            data = self._pending.pop() + data
        if len(data) < len(_BOM) and _BOM.startswith(data):
            if data:
                self._pending.append(data)
            return b""
        self._bom_pending = False
        return data[3:] if data.startswith(_BOM) else data

    def _decode_block(self, block: str) -> str | SSEEvent | None:
        """The general case: any lines, any fields. ``block`` holds no blank line."""
        data_lines: list[str] = []
        event_type = "message"
        retry: int | None = None
        for line in block.split("\n"):
            if not line or line[0] == ":":  # a stray LF left by the split, or a comment
                continue
            name, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if name == "data":
                data_lines.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\0" not in value:
                    self._last_id = value
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    retry = int(value)
            elif name == "error":
                data_lines.append(value)
                event_type = "error"
        if not data_lines:
            return None
        data = "\n".join(data_lines)
        if event_type in ("message", "") and self._last_id is None and retry is None:
            return data
        return SSEEvent(event_type or "message", data, self._last_id, retry)
