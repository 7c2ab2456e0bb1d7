"""Everything a run is checked for before it starts or writes anything: the config, the partition and
schedule, the generator checkpoints `mode=use_pretrained` will load, and the folder `resume=` continues."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from a2v_flower import config as C
from a2v_flower import site_generators
from a2v_flower.checkpoints import generator_checkpoint_name, load_tensors
from a2v_flower.data.schedule import check_schedule, held_classes, stage_classes
from a2v_flower.data.site import federation, split_site
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.generators import ReplaySpec, generator_keys
from a2v_flower.models.text_encoders import head_shapes
from a2v_flower.schema import Config


def check_run(conf: Config) -> Config:
    """`conf` itself once everything it names is checked (the config's own rules ran when it was typed); else
    ValueError (or FileNotFoundError) naming the key and value, or the file and what is wrong."""
    for key in ("output_root", "cache_dir"):  # before the synthetic dataset is written there
        check_folder(f"paths.{key}", getattr(conf.paths, key))
    clips, classes, sites = federation(C.data_spec(conf), C.partition_spec(conf))  # bad classes/sites fail here
    replay = C.replay_spec(conf, classes)                                           # and bad generator groups
    check_schedule(C.schedule_of(conf), held_classes(clips, sites), conf.num_rounds)
    if replay is not None:
        for key in generator_keys(replay.granularity, classes, replay.groups):  # keys become file names
            generator_checkpoint_name(replay.checkpoint_base, 0, replay.granularity, key)
        if replay.pretrained:
            check_pretrained(conf, replay, clips, classes, sites)
    if conf.resume:
        check_resume(conf)
    return conf


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


NAME_MAX = 255  # bytes of one name on Linux, macOS and Windows file systems


def check_folder(key: str, value: str) -> None:
    """The folder `value` of `key` exists or can be created, and can be written: every name on its way fits the
    file system, the nearest existing ancestor is a writable folder (not a file)."""
    path = Path(value)
    if long := [part for part in path.parts if len(part.encode()) > NAME_MAX]:
        raise ValueError(f"{key}={value[:60]!r}... cannot be created: a name on its way is {len(long[0].encode())} "
                         f"bytes long, more than the file system's {NAME_MAX}")
    there = existing_ancestor(path)
    if not there.is_dir():
        raise ValueError(f"{key}={value!r} cannot be created: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value!r} is not writable: {there} does not allow this user to write in it")


SECONDS_PER_ROUND = 2  # the fastest round seen (tests' tiny config, 2 sites, 2 CPU cores): a floor


def long_run_warning(conf: Config, num_classes: int) -> str | None:
    """A warning when `num_rounds` would take more than a day or its images fill half the free disk (floor
    estimates: rounds x the fastest round, render rounds x images x raw pixels); None otherwise."""
    d, rounds = conf.diffusion, conf.num_rounds
    renders = rounds // d.render_every if d.render_every else 0
    images = renders * (num_classes + d.clip_images * conf.federation.num_sites)
    size = images * d.height * d.width * 3
    hours, free = rounds * SECONDS_PER_ROUND / 3600, shutil.disk_usage(existing_ancestor(Path(conf.paths.output_root)))
    if hours < 24 and size < free.free / 2:
        return None
    return (f"num_rounds={rounds} will take at least {hours:.0f} h ({SECONDS_PER_ROUND} s a round, the smallest "
            f"config's pace) and write {images} images in {renders} render rounds, up to {size / 2**30:.1f} GiB "
            f"({free.free / 2**30:.1f} GiB free under paths.output_root); checkpoints keep the last two rounds only")


def token_shape(conf: Config) -> tuple[int, int]:
    """(K, D): the compact clip representation adapters and generators take."""
    return conf.model.audio.tokens, encoder_dim(conf.model.audio)


def check_pretrained(conf: Config, replay: ReplaySpec, clips: list, classes: list[str],
                     sites: list[list[int]]) -> None:
    """Every generator file a site will load in round 1 exists, is readable and matches the configured
    generator: type, granularity, classes, token shape and every tensor's shape (the site's own loader runs)."""
    schedule = C.schedule_of(conf)
    for site, idx in enumerate(sites):
        labels = [classes.index(clips[i].category) for i in idx]
        y = torch.tensor([labels[i] for i in split_site(labels, C.data_spec(conf), site)["train"]])
        stage = stage_classes(schedule, site, 1)
        if stage is not None:
            y = y[torch.isin(y, torch.tensor([classes.index(c) for c in stage]))]
        site_generators.load_site_generators(replay, site, classes, y, token_shape(conf))


def check_resume(conf: Config) -> None:
    """The newest server checkpoint is this app's, fits the config's adapters, and every site's state
    file of that round is there and readable."""
    from a2v_flower.resume import load_server_checkpoint  # imports Flower: only when resuming

    run_dir = Path(conf.resume)
    rnd, adapters, _, _ = load_server_checkpoint(run_dir, conf)
    k, d = token_shape(conf)
    shapes = head_shapes(conf.diffusion.type, conf.diffusion.t5_seq_len)
    want = {n: tuple(v.shape) for n, v in AdapterSet(d, shapes, **C.adapter_keywords(conf)).state_dict().items()}
    have = {n: tuple(v.shape) for n, v in adapters.items()}
    if have != want:
        bad = sorted(n for n in have.keys() | want.keys() if have.get(n) != want.get(n))[:3]
        raise ValueError(f"resume: the adapters in {run_dir}/checkpoints/server_round_{rnd}.safetensors do not fit "
                         "this config: " + "; ".join(f"{n} is {have.get(n)} there, {want.get(n)} here" for n in bad))
    for site in range(conf.federation.num_sites):
        path = run_dir / "state" / f"site_{site}_round_{rnd}.safetensors"
        _, meta = load_tensors(path)  # missing or corrupt: raises naming the file
        if meta.get("round") != rnd or meta.get("site") != site:
            raise ValueError(f"resume: {path} holds site {meta.get('site')} round {meta.get('round')}, "
                             f"expected site {site} round {rnd}")
