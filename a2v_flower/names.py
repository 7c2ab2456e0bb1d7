"""Names that become file names: the one check every name made from a class, site, group or key goes through,
and the granularities that name a site's generator files."""

from __future__ import annotations

import os

_SEPARATORS = {"/", "\\", os.sep, os.altsep} - {None}
GRANULARITIES = ("unified", "per_class", "per_group")  # which classes each generator models (models/generators/keys.py)


def check_granularity(granularity: str) -> None:
    """ValueError naming the key granularity.granularity unless `granularity` is one of GRANULARITIES."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity.granularity={granularity!r} is not allowed; "
                         f"expected one of {list(GRANULARITIES)}")


MAX_BYTES = 200  # file systems allow 255; names get a prefix or suffix (a time stamp, _round_12.safetensors)


def safe_name(value: str, what: str) -> str:
    """`value` if it can name a file inside its folder; ValueError naming `what` otherwise.

    Refused rather than rewritten: two classes 'a/b' and 'a_b' must not end up in one file.
    """
    text = str(value)
    bad = ("is empty" if not text.strip() else
           "is '.' or '..'" if text in (".", "..") else
           "contains a path separator" if any(s in text for s in _SEPARATORS) else
           "contains '..'" if ".." in text else
           "contains a control character" if any(ord(ch) < 32 or ord(ch) == 127 for ch in text) else
           "starts with '.'" if text.startswith(".") else
           f"is {len(text.encode())} bytes long, more than {MAX_BYTES}" if len(text.encode()) > MAX_BYTES else None)
    if bad:
        shown = repr(text) if len(text) <= 60 else f"{text[:40]!r}...({len(text)} characters)"
        raise ValueError(f"{what}={shown} cannot name a file: it {bad}; expected a plain name such as 'dog'")
    return text
