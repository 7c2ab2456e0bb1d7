"""What one site holds: its share of the federation's clips, read, embedded (cached on disk) and split."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from a2v_flower.cache import TensorCache, file_sha1, sha1_of
from a2v_flower.data import partition as part_lib
from a2v_flower.data.esc50 import Clip, load_clip, read_metadata
from a2v_flower.data.hf import HFSpec, read_clips as read_hf_clips
from a2v_flower.data.synthetic import SyntheticSpec, generate
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Dataset location and preprocessing (conf: data.*)."""

    cache_dir: str
    root: str | None
    classes: tuple[str, ...] | None
    folds: tuple[int, ...] | None
    clip_seconds: float
    splits: tuple[tuple[str, float], ...]
    synthetic: SyntheticSpec | None  # set: generate the dataset first
    hf: HFSpec | None  # set: a Hugging Face dataset instead of an ESC-50 folder
    seed: int
    duplicates: str  # clips whose audio repeats an earlier row's: drop | refuse


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """How clips are assigned to sites (conf: partition.*, federation.num_sites)."""

    mode: str
    num_sites: int
    sites: tuple[tuple[str, ...], ...] | None
    alpha: float
    seed: int
    min_partition_size: int  # dirichlet: Flower Datasets redraws until every site holds this many clips
    classes_per_site: int  # pathological
    shards_per_site: int  # shards
    held_out: float  # evaluate.mode=server: share of each class's clips no site holds (the server's test set)
    per_site: int  # partition=pool: clips each site draws from the shared pool


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
    return read_metadata(dataset_root(data), list(data.folds) if data.folds else None, classes, data.duplicates)


def federation(data: DataSpec, part: PartitionSpec) -> tuple[list[Clip], list[str], list[list[int]]]:
    """All clips, the class list (ESC-50 target order) and each site's clip indices; validates all. With
    `part.held_out` a seeded, class-stratified share of the clips is in no site: the server's test set.
    Kept per process while the metadata file is unchanged: a simulated actor serves many sites of one run."""
    meta = dataset_root(data) / "meta" / "esc50.csv" if data.hf is None else None
    stamp = (meta.stat().st_mtime_ns, meta.stat().st_size) if meta is not None and meta.is_file() else None
    return _federation(data, part, stamp)


@functools.lru_cache(maxsize=4)
def _federation(data: DataSpec, part: PartitionSpec, stamp) -> tuple[list[Clip], list[str], list[list[int]]]:
    """`federation`, computed."""
    clips = read_clips(data)
    classes = sorted({c.category for c in clips}, key=lambda n: min(c.target for c in clips if c.category == n))
    sites = [list(s) for s in part.sites] if part.sites else None
    held = set(part_lib.held_out([c.target for c in clips], part.held_out, part.seed)) if part.held_out else set()
    keep = [i for i in range(len(clips)) if i not in held]
    parts = part_lib.partition([clips[i] for i in keep], part.mode, part.num_sites, part.seed, sites, part.alpha,
                               part.min_partition_size, part.classes_per_site, part.shards_per_site, part.per_site)
    return clips, classes, [[keep[j] for j in p] for p in parts]


def server_clips(clips: list[Clip], sites: list[list[int]]) -> list[Clip]:
    """The clips no site holds (evaluate.mode=server's test set), in metadata order."""
    used = {i for s in sites for i in s}
    return [c for i, c in enumerate(clips) if i not in used]


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
    """Embeddings (N, tokens, D) of `clips`, from the cache where its entry verifies (else recomputed);
    unreadable files and non-finite embeddings are skipped with a warning and counted."""
    hashes = [file_sha1(c.path) if c.path.is_file() else None for c in clips]
    keys = [sha1_of(encoder.identity, h, num_samples) if h else None for h in hashes]
    shape = {"tokens": (encoder.spec.tokens, encoder_dim(encoder.spec))}
    found = {i: cache.get(k, shape) for i, k in enumerate(keys) if k is not None}
    missing = [i for i, k in enumerate(keys) if k is None or found.get(i) is None]
    skipped = []
    for start in tqdm(range(0, len(missing), 64), desc=desc, disable=not missing):
        chunk = missing[start:start + 64]
        waves, lengths, ok = [], [], []
        for i in chunk:
            try:
                wave, length = load_clip(clips[i].path, encoder.spec.sampling_rate, num_samples)
                if not np.isfinite(wave).all():
                    raise ValueError("non-finite samples")
            except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
                log.warning("Skipping unreadable audio file %s: %s", clips[i].path, err)
                skipped.append(str(clips[i].path))
                continue
            waves.append(wave)
            lengths.append(length)
            ok.append(i)
        if waves:
            for i, emb in zip(ok, encoder.encode(waves, lengths)):
                if not torch.isfinite(emb).all():  # never cached, never trained on
                    log.warning("Skipping audio file %s: its embedding holds NaN or Inf", clips[i].path)
                    skipped.append(str(clips[i].path))
                    continue
                cache.put(keys[i], {"tokens": emb.clone()}, {"encoder": encoder.identity, "clip_sha1": hashes[i],
                                                             "num_samples": num_samples, "file": clips[i].path.name})
                found[i] = {"tokens": emb}
    kept = [i for i in range(len(clips)) if found.get(i) is not None]
    if not kept:
        raise ValueError(f"No usable audio: all {len(clips)} clips were unreadable (first: {skipped[:3]})")
    return torch.stack([found[i]["tokens"] for i in kept]), [clips[i] for i in kept], skipped


def split_site(labels: list[int], data: DataSpec, site_id: int) -> dict[str, list[int]]:
    """Positions of a site's clips in each split: stratified per class, seeded by site."""
    return part_lib.split(labels, dict(data.splits), seed=data.seed + 1000 * site_id)
