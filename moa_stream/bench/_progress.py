"""The progress display of ``moa-stream bench``, on stderr.

On a terminal it is one line, redrawn in place (at most ten times a second, so drawing costs the
measured client next to nothing); otherwise one line per finished cell, which reads well in a
log file.
"""

from __future__ import annotations

import time
from typing import IO, Any

__all__ = ["Progress"]

_REDRAW_EVERY = 0.1


class Progress:
    def __init__(self, out: IO[str] | None, cells: int) -> None:
        self.out = out
        self.live = bool(out is not None and out.isatty())
        self.cells = cells
        self.cell = 0
        self.label = ""
        self.total = 0
        self.done = 0
        self.failed = 0
        self.skipped = 0
        self._drawn = 0.0

    def cell_started(self, scenario: str, strategy: str, runs: int) -> None:
        self.cell += 1
        self.label = f"{scenario} · {strategy}"
        self.total = runs
        self.done = 0
        self.failed = 0
        self._draw(force=True)

    def run_done(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self._draw()

    def cell_done(self, summary: dict[str, Any]) -> None:
        if self.out is None:
            return
        ttft = summary.get("ttft_p50_s")
        quality = summary.get("quality")
        line = (
            f"[{self.cell}/{self.cells}] {self.label}: {summary['requests']} runs in "
            f"{summary['wall_s']:.1f} s, TTFT p50 "
            + ("-" if ttft is None else f"{ttft:.3f} s")
            + (", quality -" if quality is None else f", quality {100 * quality:.0f}%")
            + (f", {summary['errors']} failed" if summary["errors"] else "")
        )
        self._write(line, final=True)

    def cell_skipped(self, label: str, needs: str) -> None:
        """A planned cell that will not run because its strategy does not apply: it counts as
        done (the total stays what was announced) and the line says why."""
        self.cell += 1
        self.skipped += 1
        reason = needs if needs == "not applicable" else f"it needs {needs}"
        self.message(f"[{self.cell}/{self.cells}] {label}: skipped, {reason}")

    def message(self, text: str) -> None:
        if self.out is not None:
            self._write(text, final=True)

    def close(self) -> None:
        if self.out is not None and self.live:
            self.out.write("\r\x1b[K")
            self.out.flush()

    def _draw(self, force: bool = False) -> None:
        if self.out is None or not self.live:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _REDRAW_EVERY and self.done < self.total:
            return
        self._drawn = now
        failed = f", {self.failed} failed" if self.failed else ""
        self._write(f"[{self.cell}/{self.cells}] {self.label}: {self.done}/{self.total}{failed}")

    def _write(self, text: str, final: bool = False) -> None:
        assert self.out is not None
        if self.live:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()
