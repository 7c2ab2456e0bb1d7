"""Granularity: which classes each generator models (one unified, one per class, one per group)."""

from __future__ import annotations

from a2v_flower.names import GRANULARITIES, check_granularity  # also checkpoints.py's, so they live a floor below

__all__ = ["GRANULARITIES", "check_granularity", "generator_keys", "key_for"]


def generator_keys(granularity: str, classes: list[str],
                   groups: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Which classes each generator models: {"unified": all}, {class: [class]} or {group: its classes}."""
    check_granularity(granularity)
    if granularity != "per_group":
        return {"unified": list(classes)} if granularity == "unified" else {c: [c] for c in classes}
    if not groups:
        raise ValueError("granularity.groups is empty but granularity='per_group'; expected {group: [classes]}")
    owner: dict[str, str] = {}
    for name, members in groups.items():
        if not members:
            raise ValueError(f"granularity.groups.{name}=[] is empty; every group needs at least one class")
        for c in members:
            if c not in classes:
                raise ValueError(f"granularity.groups.{name} names unknown class {c!r}; known classes: {list(classes)}")
            if c in owner:
                raise ValueError(f"class {c!r} is in granularity.groups.{owner[c]} and granularity.groups.{name}; "
                                 "each class belongs to exactly one group")
            owner[c] = name
    if missing := [c for c in classes if c not in owner]:
        raise ValueError(f"classes {missing} are in no group of granularity.groups (groups: {list(groups)})")
    return {name: list(members) for name, members in groups.items()}


def key_for(granularity: str, class_name: str, groups: dict[str, list[str]] | None = None) -> str:
    """The generator key that models `class_name`."""
    check_granularity(granularity)
    if granularity != "per_group":
        return "unified" if granularity == "unified" else class_name
    for name, members in (groups or {}).items():
        if class_name in members:
            return name
    raise ValueError(f"class {class_name!r} is in no group of granularity.groups (groups: {list(groups or {})})")
