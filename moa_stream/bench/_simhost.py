"""The simulated upstream in a child process, started and stopped on command.

Benchmarks measure the client. On a small machine a simulator in the same process would take
its CPU time from the client and inflate every latency measured, so the simulator runs in a
process of its own (a fresh interpreter, so nothing of the parent's event loop is inherited)
and is driven over its standard input and output: ``start`` a fresh
:class:`~moa_stream.sim.SimServer` with given models and seed, ``stop`` it, ``exit``. A fresh
server per benchmark cell means every cell sees the same seeded schedule, so strategies are
compared on identical proposer timings.

:class:`InProcessSimHost` has the same interface with the server in the calling process, for
tests and for machines where spawning is not wanted.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

from moa_stream._resource import AsyncClosable, AsyncResource
from moa_stream.sim import SimModel, SimRecord, SimServer

__all__ = ["InProcessSimHost", "ProcessSimHost", "SimHost", "record_fields"]


class SimHost(AsyncClosable, Protocol):
    """Somewhere a simulated upstream can be (re)started: in this process or another."""

    async def start(self, models: Sequence[SimModel], seed: int) -> str:
        """Start a fresh server (stopping any previous one); its base URL."""
        ...

    async def stop(self) -> None: ...

    async def records(self) -> list[dict[str, Any]]:
        """The current server's request records (see :func:`record_fields`)."""
        ...


def record_fields(record: SimRecord) -> dict[str, Any]:
    """The fields of a request record a benchmark reads (times on ``time.monotonic()``)."""
    return {
        "request_id": record.request_id,
        "model": record.model,
        "stream": record.stream,
        "outcome": record.outcome,
        "received_at": record.received_at,
        "scheduled_first_token_at": record.scheduled_first_token_at,
        "first_token_sent_at": record.first_token_sent_at,
        "last_token_sent_at": record.last_token_sent_at,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "fault": record.fault,
        "fault_at": record.fault_at,
        "retry_after_s": record.retry_after_s,
        "end_offset": record.end_offset,
        "token_offsets": list(record.token_offsets),
        "token_chars": list(record.token_chars),
        "repeat_key": record.repeat_key,
        "occurrence": record.occurrence,
    }


class InProcessSimHost(AsyncResource):
    """A :class:`SimHost` that runs the server in the calling event loop."""

    def __init__(self) -> None:
        self.server: SimServer | None = None

    async def start(self, models: Sequence[SimModel], seed: int) -> str:
        await self.stop()
        self.server = SimServer(models=list(models), seed=seed)
        await self.server.start()
        return self.server.base_url

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.aclose()

    async def records(self) -> list[dict[str, Any]]:
        return [] if self.server is None else [record_fields(r) for r in self.server.records]

    async def aclose(self) -> None:
        await self.stop()


_HEADER = struct.Struct("!I")


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))


async def child_serve() -> None:
    """The child's side: commands on stdin, replies on the original stdout."""
    loop = asyncio.get_running_loop()
    # Anything else the child prints (logs) must not corrupt the replies: the replies keep the
    # original stdout and everything else is sent to stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    server: SimServer | None = None
    try:
        while True:
            try:
                command: tuple[Any, ...] = await _read_frame(reader)
            except asyncio.IncompleteReadError:
                break  # the parent went away: nothing left to serve
            if command[0] == "start":
                if server is not None:
                    await server.aclose()
                server = SimServer(models=command[1], seed=command[2], records_maxlen=None)
                await server.start()
                out.write(_frame(("ok", server.base_url)))
            elif command[0] == "cpu":
                out.write(_frame(("ok", time.process_time())))
            elif command[0] == "records":
                records = [] if server is None else [record_fields(r) for r in server.records]
                out.write(_frame(("ok", records)))
            elif command[0] == "stop":
                if server is not None:
                    await server.aclose()
                    server = None
                out.write(_frame(("ok", None)))
            else:
                break
    finally:
        if server is not None:
            await server.aclose()


class ProcessSimHost(AsyncResource):
    """A :class:`SimHost` whose server runs in a child process (``python -m
    moa_stream.bench._simchild``), on uvloop by default: the simulator's fastest setting.
    ``cpu`` pins the child to that CPU (Linux)."""

    def __init__(
        self, *, use_uvloop: bool = True, cpu: int | None = None, timeout: float = 60.0
    ) -> None:
        self._use_uvloop = use_uvloop
        self._cpu = cpu
        self._timeout = timeout
        self._process: asyncio.subprocess.Process | None = None

    async def _call(self, *command: Any) -> Any:
        process = self._process
        if process is None:
            args = [sys.executable, "-m", "moa_stream.bench._simchild"]
            if not self._use_uvloop:
                args.append("--asyncio")
            if self._cpu is not None:
                args += ["--cpu", str(self._cpu)]
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self._process = process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(_frame(command))
        async with asyncio.timeout(self._timeout):
            await process.stdin.drain()
            reply = await _read_frame(process.stdout)
        return reply[1]

    async def start(self, models: Sequence[SimModel], seed: int) -> str:
        url = await self._call("start", list(models), seed)
        assert isinstance(url, str)
        return url

    async def stop(self) -> None:
        if self._process is not None:
            await self._call("stop")

    async def cpu_seconds(self) -> float:
        """CPU time the child process has used so far."""
        seconds = await self._call("cpu")
        assert isinstance(seconds, float)
        return seconds

    async def records(self) -> list[dict[str, Any]]:
        if self._process is None:
            return []
        records = await self._call("records")
        assert isinstance(records, list)
        return records

    async def aclose(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.write(_frame(("exit",)))
                process.stdin.close()
            async with asyncio.timeout(10.0):
                await process.wait()
        except (OSError, TimeoutError):
            process.kill()
            await process.wait()
