"""The pytest plugin's entry point: :mod:`moa_stream.testing.pytest_plugin`, re-exported.

pytest loads this module through the ``pytest11`` entry point and registers the plugin under
its name, ``moa_stream.pytest_plugin`` (``-p no:moa_stream.pytest_plugin`` disables it, and a
``conftest.py`` that lists this name in ``pytest_plugins`` loads it once). The fixtures and the
hook are those of the testing package's module, which documents them.
"""

from moa_stream.testing.pytest_plugin import (
    DEFAULT_SIM_MODELS,
    moa_sim,
    scripted_provider,
    sim_models,
)
from moa_stream.testing.pytest_plugin import pytest_configure as pytest_configure

__all__ = ["DEFAULT_SIM_MODELS", "moa_sim", "scripted_provider", "sim_models"]
