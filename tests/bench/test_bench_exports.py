"""The benchmark package's public surface: ``__all__`` lists exactly what it exports."""

from __future__ import annotations

import moa_stream.bench as bench


def test_bench_all_matches_its_public_names_and_is_sorted() -> None:
    public = {
        name
        for name, value in vars(bench).items()
        if not name.startswith("_") and type(value).__name__ != "module"
    }
    assert set(bench.__all__) == public
    assert list(bench.__all__) == sorted(bench.__all__)
