"""``moa_stream.sim`` exports exactly what its ``__all__`` lists, sorted."""

from __future__ import annotations

import moa_stream.sim


def test_all_matches_public_names() -> None:
    module = moa_stream.sim
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and type(value).__name__ != "module"
    }
    assert set(module.__all__) == public


def test_all_is_sorted() -> None:
    assert list(moa_stream.sim.__all__) == sorted(moa_stream.sim.__all__)
