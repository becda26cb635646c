"""Names people give things (collections): one canonical form, nothing invisible or terminal-controlling.

A name is NFC-normalised (``café`` typed composed or decomposed is one collection) and stripped (``"base "`` is
``"base"``); control characters (NUL, ANSI escapes), format characters (bidi overrides and isolates, zero-width
spaces and joiners, BOM), line separators, surrogates, private-use and unassigned code points are refused, so a
name shows as what it is in a terminal, a CSV and a web page.
"""

from __future__ import annotations

import unicodedata

from indexer.errors import SleuthError

MAX_NAME = 200
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class InvalidNameError(SleuthError):
    """A name is empty, too long, or holds characters that are refused (HTTP 400)."""


def clean_name(name: str, *, what: str = "a collection name") -> str:
    """``name`` in its canonical form (NFC, stripped); ``InvalidNameError`` when it cannot be one."""
    text = unicodedata.normalize("NFC", str(name)).strip()
    if not text or len(text) > MAX_NAME:
        raise InvalidNameError(f"{what} must have 1 to {MAX_NAME} characters (after stripping spaces)")
    bad = sorted({c for c in text if unicodedata.category(c) in _REFUSED_CATEGORIES})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in bad[:5])
        raise InvalidNameError(
            f"{what} may not hold control, bidi, zero-width or invisible characters ({shown})"
        )
    return text
