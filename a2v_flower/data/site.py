"""What one site holds: its share of the federation's clips, read, embedded (cached on disk) and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from a2v_flower.cache import TensorCache, file_sha1, sha1_of
from a2v_flower.data import partition as part_lib
from a2v_flower.data.esc50 import Clip, load_audio, read_metadata
from a2v_flower.data.hf import HFSpec, read_clips as read_hf_clips
from a2v_flower.data.synthetic import SyntheticSpec, generate
from a2v_flower.models.audio_encoder import AudioEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Dataset location and preprocessing (conf: data.*)."""

    cache_dir: str
    root: str | None = None
    classes: tuple[str, ...] | None = None
    folds: tuple[int, ...] | None = None
    clip_seconds: float = 5.0
    splits: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
    synthetic: SyntheticSpec | None = None  # set: generate the dataset first
    hf: HFSpec | None = None                # set: a Hugging Face dataset instead of an ESC-50 folder
    seed: int = 0


@dataclass(frozen=True)
class PartitionSpec:
    """How clips are assigned to sites (conf: partition.*, federation.num_sites)."""

    mode: str
    num_sites: int
    sites: tuple[tuple[str, ...], ...] | None = None
    alpha: float = 0.5
    seed: int = 0
    min_partition_size: int = 0   # dirichlet: Flower Datasets redraws until every site holds this many clips
    classes_per_site: int = 2     # pathological
    shards_per_site: int = 2      # shards


@dataclass
class SiteData:
    """A site's embedded clips per split; labels index `classes` (the whole federation's classes)."""

    classes: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    skipped: list[str] = field(default_factory=list)
    encoder_calls: int = 0

    @property
    def present(self) -> list[int]:
        """Class indices this site has training clips of."""
        return sorted(self.splits["train"][1].unique().tolist())


def dataset_root(data: DataSpec) -> Path:
    """The ESC-50-layout folder, generating the synthetic dataset on first use."""
    if data.synthetic is None:
        if data.root is None:
            raise ValueError("data.root is required for data=esc50: the folder with audio/ and meta/")
        return Path(data.root)
    root = Path(data.root or Path(data.cache_dir) / "synthetic" / data.synthetic.fingerprint())
    return generate(root, data.synthetic)


def read_clips(data: DataSpec) -> list[Clip]:
    """The dataset's clips: a Hugging Face dataset's written into the cache, else an ESC-50 folder's metadata."""
    classes = list(data.classes) if data.classes else None
    if data.hf is not None:
        return read_hf_clips(data.hf, Path(data.cache_dir) / "hf", classes)
    return read_metadata(dataset_root(data), list(data.folds) if data.folds else None, classes)


def federation(data: DataSpec, part: PartitionSpec) -> tuple[list[Clip], list[str], list[list[int]]]:
    """All clips, the class list (ESC-50 target order) and each site's clip indices; validates all."""
    clips = read_clips(data)
    classes = sorted({c.category for c in clips}, key=lambda n: min(c.target for c in clips if c.category == n))
    sites = [list(s) for s in part.sites] if part.sites else None
    return clips, classes, part_lib.partition(clips, part.mode, part.num_sites, part.seed, sites, part.alpha,
                                              part.min_partition_size, part.classes_per_site, part.shards_per_site)


def load_site(data: DataSpec, part: PartitionSpec, encoder: AudioEncoder, site_id: int) -> SiteData:
    """Embed the site's clips (cache first) and split them stratified per class, seeded by site."""
    if not 0 <= site_id < part.num_sites:
        raise ValueError(f"partition-id={site_id} is out of range for federation.num_sites={part.num_sites}")
    clips, classes, sites = federation(data, part)
    calls_before = encoder.calls
    cache = TensorCache(Path(data.cache_dir) / "embeddings")
    num_samples = int(data.clip_seconds * encoder.spec.sampling_rate)
    x, kept, skipped = embed_clips(encoder, [clips[i] for i in sites[site_id]], cache, num_samples,
                                   desc=f"site {site_id} embedding")
    y = torch.tensor([classes.index(c.category) for c in kept])
    splits = {name: (x[idx], y[idx]) for name, idx in split_site(y.tolist(), data, site_id).items()}
    if len(splits["train"][1]) == 0:
        raise ValueError(f"site {site_id} has no training clips after splitting; adjust data.splits")
    return SiteData(classes, splits, skipped, encoder.calls - calls_before)


def embed_clips(encoder: AudioEncoder, clips: list[Clip], cache: TensorCache, num_samples: int,
                desc: str = "embedding") -> tuple[torch.Tensor, list[Clip], list[str]]:
    """Embeddings (N, tokens, D) of `clips`, from the cache where possible; unreadable files skipped."""
    keys = [sha1_of(encoder.identity, file_sha1(c.path), num_samples) if c.path.is_file() else None
            for c in clips]
    found = {i: cache.get(k) for i, k in enumerate(keys) if k is not None}
    missing = [i for i, k in enumerate(keys) if k is None or found.get(i) is None]
    skipped = []
    for start in tqdm(range(0, len(missing), 64), desc=desc, disable=not missing):
        chunk = missing[start:start + 64]
        waves, ok = [], []
        for i in chunk:
            try:
                wave = load_audio(clips[i].path, encoder.spec.sampling_rate, num_samples)
                if not np.isfinite(wave).all():
                    raise ValueError("non-finite samples")
            except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
                log.warning("Skipping unreadable audio file %s: %s", clips[i].path, err)
                skipped.append(str(clips[i].path))
                continue
            waves.append(wave)
            ok.append(i)
        if waves:
            for i, emb in zip(ok, encoder.encode(waves)):
                cache.put(keys[i], {"tokens": emb.clone()})
                found[i] = {"tokens": emb}
    kept = [i for i in range(len(clips)) if found.get(i) is not None]
    if not kept:
        raise ValueError(f"No usable audio: all {len(clips)} clips were unreadable (first: {skipped[:3]})")
    return torch.stack([found[i]["tokens"] for i in kept]), [clips[i] for i in kept], skipped


def split_site(labels: list[int], data: DataSpec, site_id: int) -> dict[str, list[int]]:
    """Positions of a site's clips in each split: stratified per class, seeded by site."""
    return part_lib.split(labels, dict(data.splits), seed=data.seed + 1000 * site_id)
