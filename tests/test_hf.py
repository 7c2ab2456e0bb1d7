"""data=hf: an audiofolder and a save_to_disk dataset, built here, read offline into the same Clips as ESC-50."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from a2v_flower import config as C
from a2v_flower.data.hf import HFSpec, read_clips

CLASSES = ["dog", "rain", "siren"]


def hf_spec(path: str, **changes) -> HFSpec:
    """The data=hf config's dataset spec for `path`, with `changes`."""
    return dataclasses.replace(C.data_spec(C.defaults("data=hf", f"data.path={path}")).hf, **changes)


def wav_bytes(seed: int, sr: int = 16000, seconds: float = 0.5, channels: int = 1) -> bytes:
    """A short noise clip as WAV bytes (distinct per seed)."""
    wave = 0.1 * np.random.default_rng(seed).standard_normal((int(sr * seconds), channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV")
    return buf.getvalue()


def audiofolder(root: Path, per_class: int = 4) -> Path:
    """<root>/<class>/<k>.wav: the layout `load_dataset("audiofolder")` labels by folder name."""
    for t, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            (root / c / f"{k}.wav").write_bytes(wav_bytes(100 * t + k, channels=1 + k % 2))
    return root


def saved_dataset(root: Path, per_class: int = 4) -> Path:
    """A DatasetDict (train, test) written with save_to_disk: audio bytes embedded, ClassLabel labels, a group
    column, and one clip repeated (same bytes) that must be read once."""
    import datasets

    features = datasets.Features({"audio": datasets.Audio(decode=False), "label": datasets.ClassLabel(names=CLASSES),
                                  "group": datasets.Value("string")})
    groups = {"dog": "animals", "rain": "natural", "siren": "urban"}

    def split(offset: int) -> datasets.Dataset:
        rows = [(wav_bytes(offset + 100 * t + k), t, groups[c]) for t, c in enumerate(CLASSES) for k in range(per_class)]
        rows.append(rows[0])  # a duplicate of the first clip's audio
        return datasets.Dataset.from_dict({"audio": [{"bytes": b, "path": None} for b, _, _ in rows],  # cast, not
                                           "label": [y for _, y, _ in rows], "group": [g for _, _, g in rows]},  # encoded:
                                          ).cast(features)  # encoding an Audio value needs torchcodec

    datasets.DatasetDict({"train": split(0), "test": split(50)}).save_to_disk(str(root))
    return root


def test_audiofolder_becomes_clips_named_by_content(tmp_path):
    folder = audiofolder(tmp_path / "af")
    clips = read_clips(hf_spec(str(folder)), tmp_path / "cache")
    assert sorted({c.category for c in clips}) == CLASSES and len(clips) == 12
    assert {c.target for c in clips if c.category == "rain"} == {1}  # ClassLabel order: sorted folder names
    originals = {p.read_bytes() for p in folder.rglob("*.wav")}
    assert all(c.path.read_bytes() in originals and c.path.stem == __import__("hashlib").sha1(
        c.path.read_bytes()).hexdigest() for c in clips)
    assert read_clips(hf_spec(str(folder)), tmp_path / "cache") == clips  # the second process reads the manifest


def test_saved_dataset_splits_groups_classes_and_duplicates(tmp_path, caplog):
    folder = saved_dataset(tmp_path / "saved")
    both = read_clips(hf_spec(str(folder), group_column="group"), tmp_path / "cache")
    assert len(both) == 24  # 2 splits x 12; each split's repeated clip dropped
    assert "dropped 2 clips whose audio repeats" in caplog.text
    assert {(c.category, c.group) for c in both} == {("dog", "animals"), ("rain", "natural"), ("siren", "urban")}
    test = read_clips(hf_spec(str(folder), splits=("test",)), tmp_path / "cache", classes=["siren"])
    assert len(test) == 4 and {c.category for c in test} == {"siren"} and {c.group for c in test} == {None}


@pytest.mark.parametrize("spec,match", [
    (dict(splits=("validation",)), r"data.hf_splits: \['validation'\] not in .*allowed: \['train', 'test'\]"),
    (dict(label_column="category"), r"data.label_column='category' is not a column of .*allowed: \['audio'"),
    (dict(group_column="fold"), r"data.group_column='fold' is not a column"),
])
def test_bad_keys_name_the_key_and_what_is_allowed(tmp_path, spec, match):
    folder = saved_dataset(tmp_path / "saved")
    with pytest.raises(ValueError, match=match):
        read_clips(hf_spec(str(folder), **spec), tmp_path / "cache")


def test_unknown_class_and_unsafe_class_name_are_refused(tmp_path):
    import datasets

    folder = audiofolder(tmp_path / "af")
    with pytest.raises(ValueError, match=r"data.classes: \['cat'\] not in .*allowed: \['dog', 'rain', 'siren'\]"):
        read_clips(hf_spec(str(folder)), tmp_path / "cache", classes=["cat"])
    bad = datasets.Dataset.from_dict({"audio": [{"bytes": wav_bytes(0), "path": None}], "label": ["a/b"]})
    bad = bad.cast_column("audio", datasets.Audio(decode=False))
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"label='a/b' cannot name a file: it contains a path separator"):
        read_clips(hf_spec(str(tmp_path / "bad")), tmp_path / "cache")


def test_federation_reads_hf_through_the_config_and_groups_partition(tmp_path, make_cfg):
    """data=hf composes, checks and partitions (partition=groups by the dataset's own group column)."""
    from a2v_flower import config as C, preflight
    from a2v_flower.data.site import federation

    folder = saved_dataset(tmp_path / "saved")
    cfg = make_cfg("data=hf", f"data.path={folder}", "data.group_column=group", "partition=groups",
                   "federation.num_sites=2", "partition.sites=[[animals,urban],[natural]]")
    preflight.check_run(C.validate(cfg))
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    assert classes == CLASSES and [sorted({clips[i].category for i in s}) for s in sites] == [["dog", "siren"],
                                                                                              ["rain"]]
    with pytest.raises(ValueError, match=r"data.path is required for data=hf"):
        C.validate(make_cfg("data=hf"))


def test_a_missing_local_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='/nowhere/sounds': no such folder"):
        read_clips(hf_spec("/nowhere/sounds"), tmp_path / "cache")
