"""Stable seeded randomness.

Python's ``hash()`` is salted per process, so every seed here comes from a keyed BLAKE2b digest
of the parts' ``repr``: the same parts give the same stream of numbers in every process and on
every run, which is what lets tests assert on generated text and benchmarks repeat a run.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["derive_seed", "seeded_rng"]


def derive_seed(*parts: object) -> int:
    """A 64-bit integer determined by ``parts`` (compared by ``repr``)."""
    h = hashlib.blake2b(digest_size=8, person=b"moa-sim")
    for part in parts:
        h.update(repr(part).encode())
        # A separator keeps ("ab", "c") and ("a", "bc") apart.
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big")


def seeded_rng(*parts: object) -> random.Random:
    """A :class:`random.Random` seeded from ``parts``; see :func:`derive_seed`."""
    return random.Random(derive_seed(*parts))
