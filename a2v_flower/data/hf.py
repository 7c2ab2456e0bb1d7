"""A Hugging Face audio dataset (hub id, `save_to_disk` folder or `audiofolder` directory) as the Clips the
ESC-50 path reads: each clip's original bytes are written once into the cache, named by their content hash, so
the same loader, embedding cache (keyed by content) and checks run on them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from a2v_flower.data.esc50 import Clip, keep_classes
from a2v_flower.names import safe_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HFSpec:
    """Where the dataset is and which of its columns and splits to read (conf: data.path, data.hf_splits, ...)."""

    path: str                               # hub id, save_to_disk folder or audiofolder directory
    splits: tuple[str, ...] | None  # the dataset's splits to pool (None: all of them)
    audio_column: str
    label_column: str  # ClassLabel or strings
    group_column: str | None  # a class's group (partition=groups, granularity=per_group)


def load(spec: HFSpec, cache_dir: Path) -> dict:
    """{split: Dataset} of the splits asked for, audio column undecoded ({bytes, path}); columns checked."""
    import datasets

    src = Path(spec.path)
    if (src / "dataset_dict.json").is_file() or (src / "state.json").is_file():
        found = datasets.load_from_disk(str(src))
    elif src.is_dir():
        with _paths_without_torchcodec():
            found = datasets.load_dataset("audiofolder", data_dir=str(src), cache_dir=str(cache_dir / "datasets"))
    elif src.is_absolute() or spec.path.startswith((".", "~")):
        raise FileNotFoundError(f"data.path={spec.path!r}: no such folder (a hub id reads like 'user/dataset')")
    else:  # a hub id: `datasets` downloads it (on a machine with internet) into the cache
        found = datasets.load_dataset(spec.path, cache_dir=str(cache_dir / "datasets"))
    found = {"train": found} if isinstance(found, datasets.Dataset) else dict(found)
    unknown = [s for s in spec.splits or () if s not in found]
    if unknown:
        raise ValueError(f"data.hf_splits: {unknown} not in {spec.path}; allowed: {list(found)}")
    out = {s: found[s] for s in spec.splits or found}
    columns = next(iter(out.values())).column_names
    for key in ("audio_column", "label_column", "group_column"):
        name = getattr(spec, key)
        if name is not None and name not in columns:
            raise ValueError(f"data.{key}={name!r} is not a column of {spec.path}; allowed: {columns}")
    return {s: d.cast_column(spec.audio_column, datasets.Audio(decode=False)) for s, d in out.items()}


def read_clips(spec: HFSpec, cache_dir: str | Path, classes: list[str] | None = None) -> list[Clip]:
    """The dataset's clips as files in `cache_dir`/audio (written once), keeping `classes` (None = all)."""
    cache_dir = Path(cache_dir)
    splits = load(spec, cache_dir)
    key = hashlib.sha1(json.dumps([asdict(spec), {s: d._fingerprint for s, d in splits.items()}],
                                  sort_keys=True).encode()).hexdigest()[:16]
    manifest = cache_dir / "manifests" / f"{key}.json"
    if manifest.is_file():  # written by an earlier process: the files are there, nothing to hash again
        rows = json.loads(manifest.read_text())
    else:
        rows = materialise(spec, splits, cache_dir / "audio")
        manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_name(f"{manifest.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, manifest)
    clips = [Clip(cache_dir / "audio" / r["file"], 0, r["target"], r["category"], group=r["group"]) for r in rows]
    clips = keep_classes(clips, classes, spec.path)
    if not clips:
        raise ValueError(f"data.path={spec.path!r}: no clips in splits {list(splits)}")
    return clips


def materialise(spec: HFSpec, splits: dict, folder: Path) -> list[dict]:
    """Write every clip's bytes to `folder`/<sha1><suffix> (once); one row per distinct clip: file, class, group.
    A clip whose bytes cannot be found keeps a file name that does not exist: the loader skips and counts it."""
    folder.mkdir(parents=True, exist_ok=True)
    names, by_name = label_names(spec, splits)
    rows, seen, duplicates = [], set(), 0
    for split, d in splits.items():
        i, group_names = -1, getattr(d.features.get(spec.group_column), "names", None)  # a ClassLabel's names
        for batch in d.iter(batch_size=64):  # a batch's bytes in memory at a time, not the dataset's
            for audio, label, group in zip(batch[spec.audio_column], batch[spec.label_column],
                                           batch[spec.group_column] if spec.group_column else [None] * 64):
                i += 1
                category = str(label) if by_name else names[label]
                safe_name(category, f"{spec.path}: {split}[{i}].{spec.label_column}")  # classes name files
                data = audio.get("bytes") or (Path(audio["path"]).read_bytes() if audio.get("path")
                                              and Path(audio["path"]).is_file() else None)
                file = f"missing-{split}-{i}"
                if data is not None:
                    file = hashlib.sha1(data).hexdigest() + (Path(audio.get("path") or "").suffix.lower() or ".wav")
                    if file in seen:
                        duplicates += 1
                        continue
                    write_once(folder / file, data)
                seen.add(file)
                rows.append({"file": file, "target": names.index(category), "category": category,
                             "group": None if group is None else group_names[group] if group_names else str(group)})
    if duplicates:
        log.warning("%s: dropped %d clips whose audio repeats an earlier clip's bytes", spec.path, duplicates)
    return rows


def label_names(spec: HFSpec, splits: dict) -> tuple[list[str], bool]:
    """Class names in target order, and whether labels are names: a ClassLabel's names (labels are their
    indices), else the sorted distinct values of the label column as text."""
    feature = next(iter(splits.values())).features[spec.label_column]
    if hasattr(feature, "names"):
        return list(feature.names), False
    return sorted({str(v) for d in splits.values() for v in d[spec.label_column]}), True


def write_once(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically unless it is there already (named by content: same bytes)."""
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


@contextlib.contextmanager
def _paths_without_torchcodec():
    """`datasets` 4.x's Audio.encode_example imports torchcodec even to store a file's path (the audiofolder
    builder); torchcodec needs FFmpeg and a matching torch, and nothing here decodes with it. Store paths and bytes
    without it for the duration."""
    from datasets.features.audio import Audio

    original = Audio.encode_example

    def encode(self, value):
        if isinstance(value, (str, Path)):
            return {"bytes": None, "path": str(value)}
        if isinstance(value, dict) and "array" not in value:
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return original(self, value)

    Audio.encode_example = encode
    try:
        yield
    finally:
        Audio.encode_example = original
