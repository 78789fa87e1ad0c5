"""Helpers of the scale-out tier."""

from __future__ import annotations

import shutil


def haproxy_binary() -> str | None:
    """The ``haproxy`` executable: on the PATH, or where Debian puts it (``/usr/sbin``, which
    is not on every user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
