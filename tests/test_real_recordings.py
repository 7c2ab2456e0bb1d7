"""Real recordings (benchmarks/real_recordings.py, issue 28): the folder builds, and learning fits it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from a2v_flower import config as C
from a2v_flower.cache import TensorCache
from a2v_flower.data.esc50 import read_metadata
from a2v_flower.data.site import load_site
from a2v_flower.metrics import retrieval
from a2v_flower.models.adapters import build_adapters, embedding_moments, input_norm
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.training import predict, train_adapters
from benchmarks import real_recordings
from benchmarks.bench_quality import GROUPS, HARD, select

EPOCHS = 80  # the in-process budget: more than the default run's 8 rounds x 8 local epochs


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    real_recordings.build(root, clip_seconds=0.5, small=True)
    return root


def test_small_folder_is_esc50_layout_and_mixed(small):
    clips = read_metadata(small)
    assert len(clips) == 5 * real_recordings.SMALL_CLIPS
    assert {c.category for c in clips} == set(real_recordings.SMALL)
    assert {c.path.suffix for c in clips} == {".wav", ".flac", ".ogg"}
    assert {c.fold for c in clips} <= {1, 2, 3, 4, 5} and all(c.path.is_file() for c in clips)
    before = {p.name: p.read_bytes() for p in (small / "audio").iterdir()}
    real_recordings.build(small, clip_seconds=0.5, small=True)  # a rebuild writes the same bytes (cache keys)
    assert {p.name: p.read_bytes() for p in (small / "audio").iterdir()} == before


@pytest.mark.slow
def test_centralised_training_fits_real_recordings(small, make_cfg):
    """One site holding every clip, the app's default encoder window (5.12 s) and adapter (standardised inputs, token
    embedding): the adapters must fit their training clips (issue 28: >= 0.95). Fails before issue 28's items 1-2
    (padding and un-normalised inputs: fit ~0.4)."""
    cfg = make_cfg("data=esc50", f"data.root={small}", "data.clip_seconds=0.5", "partition=iid",
                   "federation.num_sites=1", "model.audio.max_length=512", "adapter.width=256")
    t0 = time.perf_counter()
    conf = C.validate(cfg)
    site = load_site(C.data_spec(conf), C.partition_spec(conf), AudioEncoder(conf.model.audio), 0)
    targets = class_targets(site.classes, conf.prompt_template, conf.diffusion.type, conf.model.text,
                            conf.diffusion.t5_seq_len, TensorCache(Path(conf.paths.cache_dir) / "targets"))
    x, y = site.splits["train"]
    adapters = build_adapters(encoder_dim(conf.model.audio), targets, seed=0,
                              norm=input_norm([embedding_moments(x)]), **C.adapter_keywords(conf))  # as the app
    train_adapters(adapters, x, y, targets, replace(conf.train, local_epochs=EPOCHS), seed=0)
    fit = retrieval(predict(adapters, x), y, targets)["top1"]
    xt, yt = site.splits["test"]
    test = retrieval(predict(adapters, xt), yt, targets)["top1"]
    print(f"real recordings, centralised: train fit {fit:.3f} ({len(y)} clips), test top-1 {test:.3f} "
          f"({len(yt)} clips), {time.perf_counter() - t0:.0f} s")
    assert fit >= 0.95, f"train fit {fit:.3f} on {len(y)} training clips of real recordings (test top-1 {test:.3f})"


def test_label_skew_replaces_the_groups_partition():
    skew = ("partition=classes", "partition.sites=[[dog,cow],[owl]]")
    assert [s.overrides for s in select("non-IID", skew)] == [skew]
    assert [s.overrides for s in select("hard", skew)][:1] == [skew + HARD]   # the data difficulty stays
    assert select("class-incremental", skew)[0].overrides[0] == "partition=iid"  # no groups there: unchanged
    assert [s.overrides for s in select("non-IID")] == [GROUPS]
