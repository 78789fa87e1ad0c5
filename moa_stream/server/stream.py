"""What a streamed chat completion writes for each event of its run, as bytes. Pure: no I/O,
no clock; the handler writes what :class:`StreamWriter` returns and decides when the headers go
out.

The bytes of one stream, in order:

- with progress or reasoning asked for, their frames while the proposers run;
- the role chunk, just before the first ``data:`` chunk (the first answer token, or the first
  reasoning chunk);
- one content chunk per answer token;
- at ``run.done``: the last progress frame, the finish chunk, the usage chunk if asked for,
  ``[DONE]``; or, if the run failed, an error frame and ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field

from moa_stream._wire import DONE, ChunkEncoder, WireError
from moa_stream.engine.events import Event, ReferenceInfo, RunDone, RunReport
from moa_stream.server.progress import ProgressEncoder

__all__ = ["StreamWriter", "is_degraded", "narration", "no_usable_reference"]

#: The extension field that marks an answer written without any proposer's help.
DEGRADED_EXTENSION = {"moa_stream": {"degraded": True}}

#: The extension field of a usage chunk whose figures are partly this package's estimate (an
#: upstream sent no usage): the OpenAI ``usage`` object stays standard, the mark sits beside it.
USAGE_ESTIMATED_EXTENSION = {"moa_stream": {"usage_estimated": True}}


def no_usable_reference(references: Iterable[ReferenceInfo]) -> bool:
    """Whether a layer went on with no proposer's answer at all (every one failed)."""
    return not any(r.status in ("complete", "partial") for r in references)


def is_degraded(report: RunReport) -> bool:
    """Whether some layer of the run had no proposer's answer to pass on, so the aggregator
    answered without the references a MoA is for."""
    return any(no_usable_reference(layer.references) for layer in report.layers)


def _seconds(value: float | None) -> str:
    return "" if value is None else f", first token at {value:.2f} s"


def narration(event: Event) -> str | None:
    """One line saying what ``event`` means for a person watching, or None for events not
    worth a line (tokens, the answer itself, the end)."""
    if event.type == "proposer.started":
        return f"{event.agent} is drafting an answer (layer {event.layer + 1}).\n"
    if event.type == "proposer.done":
        tokens = event.usage.completion_tokens
        return f"{event.agent} answered: {tokens} tokens{_seconds(event.ttft_s)}.\n"
    if event.type == "proposer.failed":
        return f"{event.agent} failed ({event.kind}).\n"
    if event.type == "layer.done":
        used = sum(r.status in ("complete", "partial") for r in event.references)
        line = (
            f"Layer {event.layer + 1} done ({event.reason}): "
            f"{used} of {len(event.references)} answers go forward.\n"
        )
        if used == 0:
            line += "No proposer answered: the answer is written without references.\n"
        return line
    if event.type == "aggregator.started":
        if event.attempt:
            return f"Falling back to {event.agent} to write the answer.\n"
        return f"{event.agent} is writing the answer.\n"
    if event.type == "aggregator.failed":
        return f"{event.agent} failed before answering ({event.kind}).\n"
    return None


@dataclass(slots=True, eq=False)
class StreamWriter:
    """The bytes of one streamed chat completion, event by event.

    ``progress`` adds the progress comment frames; ``reasoning`` adds a line per proposer step
    as ``reasoning_content`` deltas (chat UIs show them as the model's thinking); neither
    changes the content chunks. :attr:`eager` says whether the headers should go out at once
    (something is written before the answer) or with the first answer token.
    """

    encoder: ChunkEncoder
    _: KW_ONLY
    include_usage: bool = False
    progress: ProgressEncoder | None = None
    reasoning: bool = False
    #: The role chunk has been returned (it goes before the first data chunk only).
    started: bool = field(default=False, init=False)
    #: Some layer went on with no proposer's answer.
    degraded: bool = field(default=False, init=False)

    @property
    def eager(self) -> bool:
        """Whether anything may be written before the first answer token."""
        return self.progress is not None or self.reasoning

    def _open(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self.encoder.role()

    def answer(self, text: str) -> bytes:
        """An answer token's chunk (after the role chunk, for the first)."""
        if self.started:
            return self.encoder.content(text)
        self.started = True
        return self.encoder.role() + self.encoder.content(text)

    def event(self, event: Event) -> bytes | None:
        """The frames for any event but ``aggregator.delta`` and ``run.done``, or None."""
        if event.type == "layer.done" and no_usable_reference(event.references):
            self.degraded = True
        if self.progress is None and not self.reasoning:
            return None
        out = b""
        if self.progress is not None:
            out = self.progress.frame(event) or b""
        if self.reasoning:
            line = narration(event)
            if line is not None:
                out += self._open() + self.encoder.reasoning(line)
        return out or None

    def done(self, event: RunDone) -> bytes:
        """The end of a run that answered: finish, usage if asked for, ``[DONE]``."""
        report = event.report
        parts = [b"" if self.progress is None else self.progress.frame(event) or b""]
        parts.append(self._open())
        degraded = self.degraded or is_degraded(report)
        parts.append(
            self.encoder.finish(
                report.finish_reason or "stop", DEGRADED_EXTENSION if degraded else None
            )
        )
        if self.include_usage:
            usage = report.usage
            parts.append(
                self.encoder.usage(
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    USAGE_ESTIMATED_EXTENSION if usage.estimated else None,
                )
            )
        parts.append(DONE)
        return b"".join(parts)

    @staticmethod
    def error(error: WireError) -> bytes:
        """The end of a run that failed after the headers went out."""
        return error.frame() + DONE
