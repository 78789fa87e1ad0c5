"""A small expect-style driver for a command in a pseudo-terminal (stdlib ``pty`` only)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _take_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is the pty, so that the
    terminal turns Ctrl-C into SIGINT for it, as a shell's job control does; and SIGINT's
    default action, as a shell gives a foreground job (the test run may itself have been
    started in the background, where SIGINT is ignored and the ignoring is inherited)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PtyProcess:
    """``moa-stream ARGS`` with stdin, stdout and stderr on one pseudo-terminal, as a user's
    shell runs it."""

    def __init__(self, args: list[str], home: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        master, slave = pty.openpty()
        env = {
            **os.environ,
            "HOME": str(home),
            "TERM": "xterm",
            "PYTHONPATH": str(ROOT),
            "COLUMNS": "200",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moa_stream.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            preexec_fn=_take_terminal,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self.output = ""
        self._pos = 0

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def _read_some(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += data.decode(errors="replace")
        return True

    def expect(self, pattern: str) -> str:
        """Wait until ``pattern`` (a regex) appears after the previous match; its match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + self.timeout
        while True:
            found = regex.search(self.output, self._pos)
            if found:
                self._pos = found.end()
                return found.group(0)
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read_some(min(left, 0.5)) and self.proc.poll() is not None):
                # One last drain, then fail with what was seen.
                while self._read_some(0.1):
                    pass
                found = regex.search(self.output, self._pos)
                if found:
                    self._pos = found.end()
                    return found.group(0)
                raise AssertionError(
                    f"{pattern!r} not seen; exit code {self.proc.poll()}; output:\n{self.output}"
                )

    def wait(self) -> int:
        deadline = time.monotonic() + self.timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read_some(0.2)
        while self._read_some(0.05):
            pass
        code = self.proc.poll()
        assert code is not None, f"still running; output:\n{self.output}"
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
