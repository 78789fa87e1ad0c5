"""The public surface: what ``__all__`` lists is exactly what the package exports."""

from __future__ import annotations

import importlib

import pytest

PUBLIC_MODULES = ["moa_stream", "moa_stream.providers", "moa_stream.engine", "moa_stream.sim"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_matches_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    public = {name for name in vars(module) if not name.startswith("_")}
    public -= {n for n, v in vars(module).items() if type(v).__name__ == "module"}
    exported = set(module.__all__)
    assert exported - {"__version__"} <= public | {"__version__"}, "names in __all__ not defined"
    assert public <= exported, f"public names missing from __all__: {sorted(public - exported)}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_sorted(module_name: str) -> None:
    names = importlib.import_module(module_name).__all__
    assert list(names) == sorted(names)
