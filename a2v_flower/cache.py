"""On-disk caches keyed by content: clip embeddings and class text targets survive processes and runs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from a2v_flower.checkpoints import load_tensors, save_tensors

log = logging.getLogger(__name__)


def sha1_of(*parts: object) -> str:
    """Hex SHA-1 of the JSON encoding of `parts` (deterministic across processes)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha1(path: str | Path) -> str:
    """Hex SHA-1 of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(name_or_path: str | None, extra: dict) -> str:
    """Identify a model: its config for tiny random models, file hashes for local folders, else its id."""
    if name_or_path is None:
        return sha1_of("tiny", extra)
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix in {".json", ".safetensors", ".bin", ".model"})
        return sha1_of("local", [(str(p.relative_to(folder)), file_sha1(p)) for p in files], extra)
    return sha1_of("hub", name_or_path, extra)


class TensorCache:
    """A folder of small safetensors files, one per key; writes are atomic, corrupt entries recomputed."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File that holds `key`."""
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """Tensors stored under `key`, or None if absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_tensors(path)[0]
        except ValueError as err:
            log.warning("Ignoring corrupt cache entry %s (%s); it will be recomputed", path, err)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store `tensors` under `key`."""
        save_tensors(self.path(key), tensors)
