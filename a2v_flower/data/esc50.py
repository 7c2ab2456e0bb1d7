"""ESC-50 layout (audio/*.wav + meta/esc50.csv): metadata, class groups and audio loading."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from a2v_flower.names import safe_name

CSV_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]

# ESC-50's five semantic groups, 10 classes each, in `target` order (target = 10*group + i).
ESC50_GROUPS: dict[str, list[str]] = {
    "animals": ["dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow"],
    "natural": ["rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops",
                "wind", "pouring_water", "toilet_flush", "thunderstorm"],
    "human": ["crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps",
              "laughing", "brushing_teeth", "snoring", "drinking_sipping"],
    "domestic": ["door_wood_knock", "mouse_click", "keyboard_typing", "door_wood_creaks",
                 "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
                 "glass_breaking"],
    "urban": ["helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells",
              "airplane", "fireworks", "hand_saw"],
}
ESC50_CLASSES: list[str] = [c for group in ESC50_GROUPS.values() for c in group]


@dataclass(frozen=True)
class Clip:
    """One row of meta/esc50.csv, with the absolute path of its audio file."""

    path: Path
    fold: int
    target: int
    category: str
    group: str | None = None  # the class's group, from a Hugging Face dataset's group column (None: ESC50_GROUPS)


def read_metadata(root: str | Path, folds: list[int] | None = None,
                  classes: list[str] | None = None) -> list[Clip]:
    """Read meta/esc50.csv under `root`, keeping the given folds and classes (None = all)."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"data.root={str(root)!r}: no meta/esc50.csv there; expected the "
                                "ESC-50 layout (audio/*.wav and meta/esc50.csv)")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta}: missing columns {missing}; ESC-50 needs {CSV_COLUMNS}")
        rows = list(reader)
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        try:  # class names become file names (images, generator checkpoints): no separators, no '..'
            safe_name(r["category"], "category")
            safe_name(r["filename"], "filename")
        except ValueError as err:
            raise ValueError(f"{meta}, line {i}: {err}") from None
    clips = [Clip(root / "audio" / r["filename"], int(r["fold"]), int(r["target"]), r["category"])
             for r in rows]
    present = sorted({c.category for c in clips})
    if classes is not None:
        unknown = [c for c in classes if c not in present]
        if unknown:
            raise ValueError(f"data.classes: {unknown} not in {meta}; allowed: {present}")
        clips = [c for c in clips if c.category in set(classes)]
    if folds is not None:
        clips = [c for c in clips if c.fold in set(folds)]
    if not clips:
        raise ValueError(f"{meta}: no clips left for folds={folds} classes={classes}")
    return clips


def load_audio(path: str | Path, sample_rate: int, num_samples: int) -> np.ndarray:
    """Read any soundfile-readable clip as mono float32 at `sample_rate`, padded/trimmed."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C), ints scaled to [-1, 1]
    wave = wave.mean(axis=1)                                         # downmix to mono
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
    if len(wave) >= num_samples:
        return np.ascontiguousarray(wave[:num_samples])
    return np.pad(wave, (0, num_samples - len(wave)))

