"""ESC-50 layout (audio/*.wav + meta/esc50.csv): metadata, class groups and audio loading."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from a2v_flower.cache import file_sha1
from a2v_flower.names import safe_name

log = logging.getLogger(__name__)

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
    line: int = 0  # its line in meta/esc50.csv (the header is line 1)
    group: str | None = None  # the class's group, from a Hugging Face dataset's group column (None: ESC50_GROUPS)


def read_metadata(root: str | Path, folds: list[int] | None = None, classes: list[str] | None = None,
                  duplicates: str = "drop") -> list[Clip]:
    """Read meta/esc50.csv under `root`, keeping the given folds and classes (None = all); clips whose audio
    repeats an earlier row's are dropped or refused (`duplicates`, see `check_duplicates`)."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"data.root={str(root)!r}: no meta/esc50.csv there; expected the "
                                "ESC-50 layout (audio/*.wav and meta/esc50.csv)")
    with open(meta, newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first column
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta}: missing columns {missing}; ESC-50 needs {CSV_COLUMNS}")
        rows = list(reader)
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        try:  # class names become file names (images, generator checkpoints): no separators, no '..'
            safe_name(r["category"], "category")
            safe_name(r["filename"], "filename")
            bad = next((k for k in ("fold", "target") if not str(r[k]).strip().isdigit()), None)
            if bad:
                raise ValueError(f"{bad}={r[bad]!r} is not allowed; expected a whole number >= 0")
        except ValueError as err:
            raise ValueError(f"{meta}, line {i}: {err}") from None
    clips = [Clip(root / "audio" / r["filename"], int(r["fold"]), int(r["target"]), r["category"], line=i)
             for i, r in enumerate(rows, start=2)]
    clips = keep_classes(clips, classes, meta)
    if folds is not None:
        clips = [c for c in clips if c.fold in set(folds)]
    if not clips:
        raise ValueError(f"{meta}: no clips left for folds={folds} classes={classes}")
    return check_duplicates(clips, meta, duplicates)


def check_duplicates(clips: list[Clip], meta: Path, policy: str) -> list[Clip]:
    """`clips` less those whose audio (file content; the file name where it cannot be read) repeats an earlier
    row's, so that no clip can land in two splits; each is named in a warning (policy "drop") or the first few
    in a ValueError (policy "refuse")."""
    first: dict[str, Clip] = {}
    kept, repeats = [], []
    for clip in clips:
        ident = file_sha1(clip.path) if readable(clip.path) else f"name:{clip.path.name}"  # unreadable: skipped later
        if ident in first:
            same = first[ident]
            how = "repeats" if same.path == clip.path else f"has the same audio as {same.path.name} on"
            repeats.append(f"line {clip.line} ({clip.path.name}) {how} line {same.line}")
        else:
            first[ident] = clip
            kept.append(clip)
    if repeats and policy == "refuse":
        raise ValueError(f"data.duplicates='refuse': {meta} has {len(repeats)} duplicate clips: "
                         f"{'; '.join(repeats[:5])}; set data.duplicates=drop to keep the first of each")
    if repeats:
        more = f"; and {len(repeats) - 10} more" if len(repeats) > 10 else ""
        log.warning("%s: %d duplicate clips dropped (data.duplicates=drop): %s%s", meta, len(repeats),
                    "; ".join(repeats[:10]), more)
    return kept


def readable(path: Path) -> bool:
    """Whether `path` is a file with an audio header soundfile reads (its content can identify a clip)."""
    try:
        return path.is_file() and sf.info(str(path)).frames > 0
    except (sf.LibsndfileError, RuntimeError, OSError):
        return False


def keep_classes(clips: list[Clip], classes: list[str] | None, source) -> list[Clip]:
    """The clips of `classes` (None: all); ValueError naming data.classes and `source` for a class it lacks."""
    if classes is None:
        return clips
    present = sorted({c.category for c in clips})
    if unknown := [c for c in classes if c not in present]:
        raise ValueError(f"data.classes: {unknown} not in {source}; allowed: {present}")
    return [c for c in clips if c.category in set(classes)]


def load_audio(path: str | Path, sample_rate: int, num_samples: int) -> np.ndarray:
    """Read any soundfile-readable clip as mono float32 at `sample_rate`, padded/trimmed."""
    return load_clip(path, sample_rate, num_samples)[0]


def load_clip(path: str | Path, sample_rate: int, num_samples: int) -> tuple[np.ndarray, int]:
    """`load_audio`'s waveform and how many of its samples hold sound: the clip's length before padding, less
    trailing digital silence (ESC-50 pads short events with exact zeros), at least one sample."""
    if not Path(path).is_file():  # libsndfile would only say "System error."
        raise FileNotFoundError(f"{path}: no such audio file")
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C), ints scaled to [-1, 1]
    wave = wave.mean(axis=1)                                         # downmix to mono
    sound = int(np.flatnonzero(wave)[-1]) + 1 if wave.any() else 1   # before resampling, whose ringing is not 0
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
        sound = round(sound * sample_rate / sr)
    length = max(1, min(sound, len(wave), num_samples))
    if len(wave) >= num_samples:
        return np.ascontiguousarray(wave[:num_samples]), length
    return np.pad(wave, (0, num_samples - len(wave))), length

