"""On-disk caches keyed by content: clip embeddings and class text targets survive processes and runs.

Every entry verifies itself: it carries the key it was stored under, what it was computed from, each tensor's
shape and dtype and a checksum of its bytes; an entry that does not match (another entry copied over it, bytes
overwritten behind a valid header, NaN/Inf) is recomputed with a warning naming the file, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from a2v_flower.checkpoints import load_tensors, save_tensors

log = logging.getLogger(__name__)
_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-1: each file is read once per process


def sha1_of(*parts: object) -> str:
    """Hex SHA-1 of the JSON encoding of `parts` (deterministic across processes)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha1(path: str | Path) -> str:
    """Hex SHA-1 of a file's bytes (remembered per process until the file's size or mtime changes)."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def tensors_sha1(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-1 of the names, shapes, dtypes and bytes of `tensors` (any dtype, bfloat16 included)."""
    h = hashlib.sha1()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{list(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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
    """A folder of small safetensors files, one per key; writes are atomic, entries verified on every read."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File that holds `key`."""
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor] | None:
        """Tensors stored under `key` (with these names and `shapes` if given), or None if absent or not
        verified: a bad entry is logged naming its file, and the caller recomputes it."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
            problem = self.verify(key, tensors, meta, shapes)
        except ValueError as err:
            problem = str(err)
        if problem:
            log.warning("Ignoring cache entry %s (%s); it will be recomputed", path, problem)
            return None
        return tensors

    @staticmethod
    def verify(key: str, tensors: dict[str, torch.Tensor], meta: dict, shapes: dict[str, tuple] | None) -> str:
        """What is wrong with an entry read for `key` ('' if nothing)."""
        if meta.get("key") != key:
            return (f"it was stored for key {meta.get('key')!r}, not {key!r}: another entry copied over it"
                    if meta.get("key") else "it has no verification metadata (written by an older version)")
        have = {n: [list(t.shape), str(t.dtype)] for n, t in tensors.items()}
        if have != meta.get("tensors"):
            return f"its tensors {have} are not the ones recorded, {meta.get('tensors')}"
        if shapes is not None and {n: list(s) for n, s in shapes.items()} != {n: s for n, (s, _) in have.items()}:
            return f"its tensors {have} do not have the expected shapes {shapes}"
        if tensors_sha1(tensors) != meta.get("sha1"):
            return "its data does not match its checksum (bytes overwritten)"
        if bad := [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
            return f"{bad} hold NaN or Inf"
        return ""

    def put(self, key: str, tensors: dict[str, torch.Tensor], made_from: dict | None = None) -> None:
        """Store `tensors` under `key` with what they were computed from and a checksum."""
        meta = {"key": key, "made_from": made_from or {}, "sha1": tensors_sha1(tensors),
                "tensors": {n: [list(t.shape), str(t.dtype)] for n, t in tensors.items()}}
        save_tensors(self.path(key), tensors, meta)

    def prune(self, keep: int) -> None:
        """Remove all but the `keep` newest entries (a folder that would otherwise gain one per run)."""
        def mtime(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:  # removed meanwhile by another run's pruning
                return 0.0

        for old in sorted(self.root.glob("*/*.safetensors"), key=mtime, reverse=True)[keep:]:
            old.unlink(missing_ok=True)
