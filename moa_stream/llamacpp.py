"""Real llama.cpp inference servers for tests and benchmarks, under their old import path:
:mod:`moa_stream.testing.llamacpp`, re-exported. Nothing in the package imports this module."""

from moa_stream.testing.llamacpp import (
    DEFAULT_START_TIMEOUT,
    InferenceServer,
    InferenceServerError,
    llama_cpp_python_server,
    llama_server,
    llama_server_binary,
    smollm2_model_path,
)

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "InferenceServer",
    "InferenceServerError",
    "llama_cpp_python_server",
    "llama_server",
    "llama_server_binary",
    "smollm2_model_path",
]
