"""The live view of a run in a terminal, shared by ``moa-stream demo`` and ``moa-stream chat``.

:class:`LiveView` reads a run's events and writes two kinds of output: *progress* (a status line
of the proposers, redrawn in place on a terminal, then the layer's decision) and the *answer*
(the aggregator's text, the moment it arrives). They may go to different streams: ``chat``
writes progress on stderr and only the answer on stdout, so ``chat > answer.txt`` holds only the
answer.

Counts shown are tokens: while a proposer streams, estimated from the characters received
(:func:`~moa_stream.estimate_tokens`) and marked ``~``; once it is done, the provider's figure,
marked ``~`` only when the upstream sent no usage. Proposer states use the report's words
(``running``, ``complete``, ``failed``, ``cancelled``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import IO

from moa_stream._types import Usage, estimate_tokens
from moa_stream.engine.events import Event, ReferenceInfo, RunReport
from moa_stream.engine.spec import MoA

__all__ = ["LiveView", "fmt_seconds", "fmt_tokens", "fmt_usage_tokens", "one_line_summary"]

_MARKS = {"running": "…", "complete": "✓", "failed": "✗ failed", "cancelled": "cancelled"}
_CLEAR = "\r\x1b[K"
# Redraw the status line at most this often (seconds): every delta is a redraw otherwise.
_REDRAW_EVERY = 0.05


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def fmt_tokens(count: int, estimated: bool) -> str:
    """A token count, ``~`` in front when it is an estimate."""
    return f"~{count:,}" if estimated else f"{count:,}"


def fmt_usage_tokens(usage: Usage) -> str:
    return fmt_tokens(usage.total_tokens, usage.estimated)


class LiveView:
    """Shows a run as it happens.

    ``progress``: where the proposers' status and the layer decisions go (``None``: nowhere).
    ``answer``: where the answer's text goes. ``live``: redraw the status line in place (a
    terminal) instead of writing one line per finished proposer. ``verbose``: also say when
    the layer moved on, when the aggregator started and what failed on the way (otherwise the
    status line marks failed proposers, and the caller reports a failed run in one line).
    """

    def __init__(
        self,
        spec: MoA,
        *,
        progress: IO[str] | None,
        answer: IO[str],
        live: bool,
        verbose: bool = True,
    ) -> None:
        self.spec = spec
        self.progress = progress
        self.answer = answer
        self.live = live and progress is not None
        self.verbose = verbose
        #: characters received from each proposer (the status line's estimate)
        self.chars: dict[str, int] = {}
        #: each finished proposer's completion tokens as its provider gave them
        self.done_tokens: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.answering = False
        self._later: list[str] = []  # lines held back while the answer streams
        self._status_shown = False
        self._drawn_at = 0.0
        self._settled = False  # the layer decided: its status line is final until the next

    # -- drawing -----------------------------------------------------------------------------
    def status_line(self) -> str:
        line = "  " + "   ".join(
            f"{agent} {self._tokens(agent)} tok {_MARKS[self.state[agent]]}" for agent in self.chars
        )
        if self.live:
            # A line longer than the terminal wraps, and "\r" then redraws only its last row.
            width = shutil.get_terminal_size().columns - 1
            if len(line) > width:
                line = line[: max(0, width - 1)] + "…"
        return line

    def _tokens(self, agent: str) -> str:
        done = self.done_tokens.get(agent)
        return done if done is not None else fmt_tokens(estimate_tokens(self.chars[agent]), True)

    def _say(self, line: str) -> None:
        """A line of progress that stays (the live status line is redrawn below it)."""
        out = self.progress
        if out is None:
            return
        out.write((_CLEAR if self._status_shown else "") + line + "\n")
        self._status_shown = False
        self._redraw()

    def _redraw(self, throttle: bool = False) -> None:
        out = self.progress
        if out is None or not self.live or not self.chars or self.answering or self._settled:
            return
        now = time.monotonic()
        if throttle and now - self._drawn_at < _REDRAW_EVERY:
            return
        self._drawn_at = now
        out.write(_CLEAR + self.status_line())
        out.flush()
        self._status_shown = True

    def _settle_status(self) -> None:
        """Leave the status line as a finished line of its own."""
        out = self.progress
        if out is not None and self.live and self.chars:
            out.write(_CLEAR + self.status_line() + "\n")
            out.flush()
            self._status_shown = False

    def clear(self) -> None:
        """Erase the live status line (before an error message or a cancelled answer)."""
        if self.progress is not None and self._status_shown:
            self.progress.write(_CLEAR)
            self.progress.flush()
            self._status_shown = False

    # -- events ------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if event.type == "proposer.started":
            self._settled = False
            self.chars[event.agent] = 0
            self.done_tokens.pop(event.agent, None)
            self.state[event.agent] = "running"
            self._redraw()
        elif event.type == "proposer.delta":
            self.chars[event.agent] += len(event.text)
            self._redraw(throttle=True)
        elif event.type == "proposer.done":
            self.state[event.agent] = "complete"
            usage = event.usage
            self.done_tokens[event.agent] = fmt_tokens(usage.completion_tokens, usage.estimated)
            line = (
                f"  proposer {event.agent} done at {event.t:.2f} s "
                f"({self.done_tokens[event.agent]} tokens)"
            )
            if self.answering:
                # A staircase's proposers finish while the answer streams: a line of theirs
                # would land in the middle of the answer, so it waits for the end.
                self._later.append(line)
            elif self.live:
                self._redraw()
            else:
                self._say(line)
        elif event.type == "proposer.failed":
            self.state[event.agent] = "failed"
            if self.verbose:
                self._say(f"  proposer {event.agent} failed at {event.t:.2f} s: {event.error}")
            else:
                self._redraw()
        elif event.type == "layer.done":
            self._layer_done(event.layer, event.references, event.reason, event.cut, event.t)
        elif event.type == "aggregator.started":
            if self.verbose:
                who = "aggregator" if event.agent == "aggregator" else f"aggregator {event.agent}"
                kind = "fallback " if event.attempt else ""
                self._say(f"  {kind}{who} started at {event.t:.2f} s")
        elif event.type == "aggregator.failed" and self.verbose:
            self._say(f"  aggregator {event.agent} failed at {event.t:.2f} s: {event.error}")
        elif event.type == "aggregator.delta":
            if not self.answering:
                self.clear()
                self.answering = True
                if self.verbose and self.progress is not None:
                    self.progress.write(f"  first token at {event.t:.2f} s\n\n")
                    self.progress.flush()
            self.answer.write(event.text)
            self.answer.flush()
        elif event.type == "run.done":
            self.answer.write("\n")
            self.answer.flush()
            if self.verbose:
                for line in self._later:
                    self._say(line)
            self._later.clear()

    def _layer_done(
        self,
        layer: int,
        references: Sequence[ReferenceInfo],
        reason: str,
        cut: str | None,
        t: float,
    ) -> None:
        used = {r.agent: r.status for r in references}
        stragglers = self.spec.layers[layer].stragglers if layer < len(self.spec.layers) else ""
        if self.spec.staircase is not None and layer == len(self.spec.layers) - 1:
            stragglers = "keep"  # a staircase's proposers go on writing into its later steps
        cancelled = [
            agent
            for agent, state in self.state.items()
            if state == "running" and used.get(agent) != "partial" and stragglers == "cancel"
        ]
        for agent in cancelled:
            self.state[agent] = "cancelled"
        self._settle_status()
        self._settled = True
        if not self.verbose:
            return
        refs = ", ".join(f"{a} ({s})" for a, s in used.items()) or "none"
        after = f"; remaining layers cut ({cut})" if cut else ""
        waiting = [a for a, s in self.state.items() if s == "running"]
        kept = f"; {', '.join(waiting)} kept running" if waiting else ""
        dropped = f"; cancelled {', '.join(cancelled)}" if cancelled else ""
        self._say(
            f"  layer {layer} moved on at {t:.2f} s ({reason}) with {refs}{after}{dropped}{kept}"
        )


def one_line_summary(report: RunReport) -> str:
    """TTFT, time, tokens and which proposers made it, on one line."""
    parts = [
        f"TTFT {fmt_seconds(report.ttft_s)}",
        f"total {fmt_seconds(report.total_s)}",
        f"{fmt_usage_tokens(report.usage)} tokens",
    ]
    if report.layers:
        last = report.layers[-1]
        used = [r.agent for r in last.references if r.status in ("complete", "partial")]
        proposers = {
            a.agent for a in report.agents if a.role == "proposer" and a.layer == last.layer
        }
        parts.append(f"{len(used)}/{len(proposers)} proposers used ({', '.join(used) or 'none'})")
    if report.aggregator:
        parts.append(f"answered by {report.aggregator}")
    return " · ".join(parts)
