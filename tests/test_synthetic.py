"""The synthetic ESC-50-format dataset: layout, determinism, difficulty knobs."""

from __future__ import annotations

import dataclasses
import csv

import numpy as np
import pytest
import soundfile as sf

from a2v_flower import config as C
from a2v_flower.data.esc50 import CSV_COLUMNS, read_metadata
from a2v_flower.data.synthetic import SyntheticSpec, generate

def synthetic_spec(**changes) -> SyntheticSpec:
    """The default config's synthetic dataset, with `changes`."""
    return dataclasses.replace(C.data_spec(C.defaults()).synthetic, **changes)


SPEC = synthetic_spec(classes=("dog", "rooster", "rain"), clips_per_class=5, seconds=0.5, sample_rate=8000)


def test_layout_matches_esc50(tmp_path):
    root = generate(tmp_path / "ds", SPEC)
    with open(root / "meta" / "esc50.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 15
    assert {r["category"] for r in rows} == {"dog", "rooster", "rain"}
    assert {int(r["fold"]) for r in rows} == {1, 2, 3, 4, 5}
    dog = next(r for r in rows if r["category"] == "dog")
    assert dog["target"] == "0" and dog["filename"].endswith("-0.wav")  # ESC-50 targets and names
    clips = read_metadata(root)
    wave, sr = sf.read(clips[0].path)
    assert sr == 8000 and len(wave) == 4000


def test_deterministic_from_seed(tmp_path):
    a = generate(tmp_path / "a", SPEC)
    b = generate(tmp_path / "b", SPEC)
    c = generate(tmp_path / "c", dataclasses.replace(SPEC, seed=1))
    name = sorted(p.name for p in (a / "audio").iterdir())[0]
    assert (a / "audio" / name).read_bytes() == (b / "audio" / name).read_bytes()
    assert (a / "audio" / name).read_bytes() != (c / "audio" / name).read_bytes()


def test_overlap_knob_brings_partner_classes_together(tmp_path):
    def class_gap(overlap):
        root = generate(tmp_path / f"o{overlap}", synthetic_spec(classes=("dog", "rooster"), clips_per_class=6, seconds=0.5, sample_rate=8000, noise=0.0,
                                                                  overlap=overlap, variation=0.0))
        spec = {}
        for clip in read_metadata(root):
            x, _ = sf.read(clip.path)
            spec.setdefault(clip.category, []).append(np.log1p(np.abs(np.fft.rfft(x))))
        return np.linalg.norm(np.mean(spec["dog"], 0) - np.mean(spec["rooster"], 0))
    assert class_gap(1.0) < 0.5 * class_gap(0.0)


def test_unknown_class_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'unicorn'.*allowed"):
        generate(tmp_path / "x", synthetic_spec(classes=("unicorn",)))
