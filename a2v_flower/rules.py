"""The schema's rule helpers: a ValueError that names the key, the value and what is allowed (no torch)."""

from __future__ import annotations

import re

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # a device setting (a2v_flower.devices resolves it)


def numbers(node: str, obj, positive: tuple = (), non_negative: tuple = (), fraction: tuple = ()) -> None:
    """ValueError naming `node.name` unless each `positive` field is > 0, `non_negative` >= 0, `fraction` in [0, 1]."""
    rules = ((positive, "a number > 0", lambda v: v > 0), (non_negative, "a number >= 0", lambda v: v >= 0),
             (fraction, "a fraction in [0, 1]", lambda v: 0 <= v <= 1))
    for names, want, ok in rules:
        for n in names:
            if not ok(getattr(obj, n)):
                raise ValueError(f"{node}{n}={getattr(obj, n)!r} is not allowed; expected {want}")


def one_of(key: str, value, allowed: tuple) -> None:
    """ValueError naming `key` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; expected one of {list(allowed)}")


def device_setting(key: str, value) -> None:
    """ValueError naming `key` unless `value` is a device setting (its form only: no GPU is looked for)."""
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise ValueError(f"{key}={value!r} is not allowed; expected one of auto | cpu | cuda | cuda:N")
