"""Real llama.cpp inference servers for tests and benchmarks, under their old import path:
:mod:`moa_stream.testing.llamacpp`, re-exported. Nothing in the package imports this module."""

from moa_stream.testing.llamacpp import *  # noqa: F403
from moa_stream.testing.llamacpp import __all__ as __all__
