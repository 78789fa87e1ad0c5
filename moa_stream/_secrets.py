"""Masking API keys in text that leaves the process: error messages, progress, log lines.

An upstream's error body may quote the key it was sent ("Incorrect API key provided: sk-...").
Masking only whole occurrences is not enough: a body cut to a length limit can end in the
middle of the key and leave most of it behind. :func:`mask_secrets` therefore also masks any
run of :data:`MIN_PREFIX` or more characters that matches the start of a key, and callers mask
*before* they cut; :func:`clean` does both, in that order, for any upstream-supplied string
(a header, an error body, an id) on its way to a client or a log.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MASK", "MAX_UPSTREAM_ID_CHARS", "MIN_PREFIX", "clean", "mask_secrets"]

#: What a masked key (or key prefix) becomes.
MASK = "***"
#: The shortest start of a key that is masked on its own; shorter runs are too likely to be
#: ordinary text ("sk-") and reveal too little to matter.
MIN_PREFIX = 8
#: The longest upstream id (``x-request-id``, an error's ``code`` or ``type``) passed on: real
#: ids are tens of characters; a header can be kilobytes.
MAX_UPSTREAM_ID_CHARS = 128


def _mask_prefixes(text: str, secret: str, mask: str) -> str:
    head = secret[:MIN_PREFIX]
    start = text.find(head)
    while start != -1:
        end = start + MIN_PREFIX
        limit = min(len(text), start + len(secret))
        while end < limit and text[end] == secret[end - start]:
            end += 1
        text = text[:start] + mask + text[end:]
        start = text.find(head, start + len(mask))
    return text


def mask_secrets(text: str, secrets: Iterable[str], mask: str = MASK) -> str:
    """``text`` with every occurrence of each secret, and every run of at least
    :data:`MIN_PREFIX` characters that begins one, replaced by ``mask``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, mask)
        if len(secret) > MIN_PREFIX and secret[:MIN_PREFIX] in text:
            text = _mask_prefixes(text, secret, mask)
    return text


def clean(text: str, secrets: Iterable[str], limit: int) -> str:
    """An upstream-supplied string fit to pass on: secrets masked, *then* cut to ``limit``
    characters (cutting first could leave the start of a key straddling the cut)."""
    return mask_secrets(text, secrets)[:limit]
