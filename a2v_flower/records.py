"""Tensors <-> Flower records, as client and server send them."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


def to_record(tensors: dict[str, torch.Tensor], dtype: str | None = None) -> ArrayRecord:
    """Tensors (cast to `dtype`, e.g. "float16", if given) -> ArrayRecord (numpy-backed, as Flower sends them)."""
    cast = getattr(torch, dtype) if dtype else None
    return ArrayRecord({k: Array(v.detach().cpu().to(cast or v.dtype).numpy()) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors."""
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


def cast(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """The record with its arrays in `dtype` (adapters travel in `adapter.wire`, the server averages float32)."""
    return record if all(a.dtype == dtype for a in record.values()) else to_record(from_record(record), dtype)


def not_finite(record: ArrayRecord) -> list[str]:
    """Names of the record's floating-point arrays that hold NaN or Inf."""
    return [k for k, a in record.items() if np.issubdtype(a.numpy().dtype, np.floating) and
            not np.isfinite(a.numpy()).all()]


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (serialised numpy, as they travel)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def flatten(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{key: {name: t}} -> {"key/name": t} (one ArrayRecord for all generators)."""
    return {f"{key}/{name}": t for key, state in states.items() for name, t in state.items()}


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of `flatten` (keys are class or group names, which contain no '/')."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key, _, rest = name.partition("/")
        out.setdefault(key, {})[rest] = t
    return out
