"""The live view of a run in a terminal, shared by ``moa-stream demo`` and ``moa-stream chat``.

:class:`LiveView` reads a run's events and writes two kinds of output: *progress* (a status line
of the proposers, redrawn in place on a terminal, then the layer's decision) and the *answer*
(the aggregator's text, the moment it arrives). They may go to different streams: ``chat``
writes progress on stderr and only the answer on stdout, so ``chat > answer.txt`` holds only the
answer.

Counts shown are tokens: while a proposer streams, an estimate marked ``~`` that never
exceeds what the provider will count (the smaller of :func:`~moa_stream.estimate_tokens` of the
characters received and the number of chunks, each of which holds at least one token), so a
count never goes down when the provider's figure replaces it once the proposer is done (marked
``~`` only when the upstream sent no usage). Proposer states use the report's words
(``running``, ``complete``, ``failed``, ``cancelled``).

A staircase's proposers go on writing while its answer streams. On a terminal the status line
then stays below the answer as a footer, redrawn in place (VT100 save/restore cursor), so the
counts keep moving; it is erased before each piece of the answer and settles as a line of its
own after it. Where the answer goes elsewhere (``chat > answer.txt``) the line is simply redrawn.

Log lines (``moa-stream`` commands log to stderr, the same terminal) would land inside the live
line: the view registers with :mod:`moa_stream._log_setup`, which erases the line before a log
line and redraws it after, or holds the log lines while the answer streams on that terminal and
writes them after it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from typing import IO

from moa_stream import _log_setup
from moa_stream._types import Usage, estimate_tokens
from moa_stream.engine.events import Event, ReferenceInfo, RunReport
from moa_stream.engine.spec import MoA

__all__ = ["LiveView", "fmt_seconds", "fmt_tokens", "fmt_usage_tokens", "one_line_summary"]

_MARKS = {"running": "…", "complete": "✓", "failed": "✗ failed", "cancelled": "cancelled"}
_CLEAR = "\r\x1b[K"
# The footer below the answer: make room for a row below the cursor without losing its column
# (IND scrolls at the bottom of the screen, CUU comes back), save the cursor (DECSC), draw on
# the row below, restore (DECRC). The answer then goes on where it was.
_FOOTER_OPEN = "\x1bD\x1b[A\x1b7\x1bD\r\x1b[K"
_FOOTER_CLOSE = "\x1b8"
# Erase from the cursor (the end of the answer) to the end of the screen: the footer.
_FOOTER_ERASE = "\x1b[J"
# Redraw the status line at most this often (seconds): every delta is a redraw otherwise.
_REDRAW_EVERY = 0.05


def _same_output(a: IO[str], b: IO[str]) -> bool:
    """Whether text written to ``a`` and ``b`` ends up in one place (one terminal, pipe or file):
    then progress must stay out of the answer's way."""
    if a is b:
        return True
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


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
        #: progress and answer land in one place: nothing may be written into the answer
        self.shared = progress is not None and _same_output(progress, answer)
        #: characters received from each proposer (the status line's estimate)
        self.chars: dict[str, int] = {}
        #: content chunks received from each proposer: at least one token each
        self.chunks: dict[str, int] = {}
        #: each finished proposer's completion tokens as its provider gave them
        self.done_tokens: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.answering = False
        self._later: list[str] = []  # lines held back while the answer streams
        self._status_shown = False
        self._footer_shown = False  # the status line below a streaming answer
        self._was_shown: tuple[bool, bool] | None = None  # while a log line is written
        self._drawn_at = 0.0
        self._settled = False  # the layer decided: its status line is final until the next
        if self.live:
            _log_setup.set_live_line(self)

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
        if done is not None:
            return done
        # A lower bound, so that the provider's count never shows less than the estimate did:
        # characters / 4 over-counts long words, and every chunk holds a token or more.
        return fmt_tokens(min(estimate_tokens(self.chars[agent]), self.chunks[agent]), True)

    def _say(self, line: str) -> None:
        """A line of progress that stays (the live status line is redrawn below it)."""
        out = self.progress
        if out is None:
            return
        if self.answering and self.shared:
            # It would land in the middle of the answer: it waits for the end.
            self._later.append(line)
            return
        out.write((_CLEAR if self._status_shown else "") + line + "\n")
        self._status_shown = False
        self._redraw()

    def _redraw(self, throttle: bool = False) -> None:
        out = self.progress
        if out is None or not self.live or not self.chars or self._settled:
            return
        now = time.monotonic()
        if throttle and now - self._drawn_at < _REDRAW_EVERY:
            return
        self._drawn_at = now
        if not self.answering:
            out.write(_CLEAR + self.status_line())
            self._status_shown = True
        elif self.shared:
            out.write(_FOOTER_OPEN + self.status_line() + _FOOTER_CLOSE)
            self._footer_shown = True
        else:
            # The answer goes elsewhere (chat > answer.txt): this terminal has only progress.
            out.write(_CLEAR + self.status_line())
            self._status_shown = True
        out.flush()

    def _settle_status(self) -> None:
        """Leave the status line as a finished line of its own."""
        out = self.progress
        if out is not None and self.live and self.chars:
            out.write(_CLEAR + self.status_line() + "\n")
            out.flush()
            self._status_shown = False

    def _erase(self) -> None:
        """Erase whatever live line is shown: the status line or the footer."""
        out = self.progress
        if out is None:
            return
        if self._footer_shown:
            out.write(_FOOTER_ERASE)
            self._footer_shown = False
        elif self._status_shown:
            out.write(_CLEAR)
            self._status_shown = False
        else:
            return
        out.flush()

    def clear(self) -> None:
        """Erase the live status line (before an error message or a cancelled answer); the run
        is over for this view, so log lines held back meanwhile are written now."""
        self._erase()
        self._settled = True
        _log_setup.release_live_line(self)

    # -- log lines (moa_stream._log_setup.LiveLine) ----------------------------------------
    def before_log(self) -> bool:
        """Make room for a log line on the terminal; False: hold it until the answer ends."""
        if self.answering and self.shared:
            return False
        self._was_shown = (self._status_shown, self._footer_shown)
        self._erase()
        return True

    def after_log(self) -> None:
        """Draw the live line again where it was before the log line."""
        shown, self._was_shown = self._was_shown, None
        if shown is not None and any(shown):
            self._redraw()

    # -- events ------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if event.type == "proposer.started":
            self._settled = False
            self.chars[event.agent] = 0
            self.chunks[event.agent] = 0
            self.done_tokens.pop(event.agent, None)
            self.state[event.agent] = "running"
            self._redraw()
        elif event.type == "proposer.delta":
            self.chars[event.agent] += len(event.text)
            self.chunks[event.agent] += 1
            self._redraw(throttle=True)
        elif event.type == "proposer.done":
            self.state[event.agent] = "complete"
            usage = event.usage
            self.done_tokens[event.agent] = fmt_tokens(usage.completion_tokens, usage.estimated)
            line = (
                f"  proposer {event.agent} done at {event.t:.2f} s "
                f"({self.done_tokens[event.agent]} tokens)"
            )
            if self.live:
                self._redraw()  # the status line (or the footer below the answer) shows it
            else:
                # While a staircase's answer streams, _say keeps it for the end.
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
                if self.shared:
                    self._erase()
                self.answering = True
                if self.verbose and self.progress is not None:
                    self.progress.write(f"  first token at {event.t:.2f} s\n\n")
                    self.progress.flush()
            footer = self._footer_shown
            if footer:
                self._erase()
            self.answer.write(event.text)
            self.answer.flush()
            if footer or (self.shared and not self._settled):
                self._redraw()
        elif event.type == "run.done":
            self._run_done(event.report)

    def _run_done(self, report: RunReport) -> None:
        if self.shared:
            self._erase()  # the footer
        self.answer.write("\n")
        self.answer.flush()
        if not self._settled:
            # A staircase: its proposers wrote into the answer's steps; the run ended the rest.
            status: dict[str, str] = {a.agent: a.status for a in report.agents}
            for agent, state in self.state.items():
                if state == "running" and status.get(agent) in ("cancelled", "partial"):
                    self.state[agent] = "cancelled"
            self._erase()
            self._settle_status()
            self._settled = True
        self.answering = False
        if self.verbose:
            for line in self._later:
                self._say(line)
        self._later.clear()
        _log_setup.release_live_line(self)

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
        staircase_refs = self.spec.staircase is not None and layer == len(self.spec.layers) - 1
        if staircase_refs:
            stragglers = "keep"  # a staircase's proposers go on writing into its later steps
        cancelled = [
            agent
            for agent, state in self.state.items()
            if state == "running" and used.get(agent) != "partial" and stragglers == "cancel"
        ]
        for agent in cancelled:
            self.state[agent] = "cancelled"
        if not staircase_refs:
            self._settle_status()
            self._settled = True
        # else the proposers write on into the staircase's steps: the status line keeps moving
        # (below the answer once it streams) and settles at the end of the run.
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
