"""Everything a run is checked for before it starts or writes anything: the config, the partition and
schedule, the generator checkpoints `mode=use_pretrained` will load, and the folder `resume=` continues."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from a2v_flower import config as C
from a2v_flower import site_generators
from a2v_flower.checkpoints import generator_checkpoint_name, load_tensors
from a2v_flower.data.schedule import check_schedule, held_classes, stage_classes
from a2v_flower.data.site import federation, split_site
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.generators import ReplaySpec, generator_keys
from a2v_flower.models.text_encoders import head_shapes


def check_run(cfg: DictConfig) -> None:
    """Raise ValueError (or FileNotFoundError) naming the key and value, or the file and what is wrong."""
    C.validate(cfg)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))  # bad classes/sites fail here
    replay = C.replay_spec(cfg, classes)                                           # and bad generator groups
    check_schedule(C.schedule_of(cfg), held_classes(clips, sites), cfg.num_rounds)
    if replay is not None:
        for key in generator_keys(replay.granularity, classes, replay.groups):  # keys become file names
            generator_checkpoint_name(replay.checkpoint_base, 0, replay.granularity, key)
        if replay.pretrained:
            check_pretrained(cfg, replay, clips, classes, sites)
    if cfg.resume:
        check_resume(cfg)


def token_shape(cfg: DictConfig) -> tuple[int, int]:
    """(K, D): the compact clip representation adapters and generators take."""
    return cfg.model.audio.tokens, encoder_dim(C.audio_spec(cfg))


def check_pretrained(cfg: DictConfig, replay: ReplaySpec, clips: list, classes: list[str],
                     sites: list[list[int]]) -> None:
    """Every generator file a site will load in round 1 exists, is readable and matches the configured
    generator: type, granularity, classes, token shape and every tensor's shape (the site's own loader runs)."""
    schedule = C.schedule_of(cfg)
    for site, idx in enumerate(sites):
        labels = [classes.index(clips[i].category) for i in idx]
        y = torch.tensor([labels[i] for i in split_site(labels, C.data_spec(cfg), site)["train"]])
        stage = stage_classes(schedule, site, 1)
        if stage is not None:
            y = y[torch.isin(y, torch.tensor([classes.index(c) for c in stage]))]
        site_generators.load_site_generators(replay, site, classes, y, token_shape(cfg))


def check_resume(cfg: DictConfig) -> None:
    """The newest server checkpoint is this app's, fits the config's adapters, and every site's state
    file of that round is there and readable."""
    from a2v_flower.resume import load_server_checkpoint  # imports Flower: only when resuming

    run_dir = Path(cfg.resume)
    rnd, adapters, _, _ = load_server_checkpoint(run_dir, cfg)
    k, d = token_shape(cfg)
    want = {n: tuple(v.shape) for n, v in AdapterSet(d, head_shapes(cfg.diffusion.type, C.t5_seq_len(cfg)),
                                                     cfg.adapter.width, cfg.adapter.heads, cfg.adapter.kind,
                                                     cfg.adapter.rank).state_dict().items()}
    have = {n: tuple(v.shape) for n, v in adapters.items()}
    if have != want:
        bad = sorted(n for n in have.keys() | want.keys() if have.get(n) != want.get(n))[:3]
        raise ValueError(f"resume: the adapters in {run_dir}/checkpoints/server_round_{rnd}.safetensors do not fit "
                         "this config: " + "; ".join(f"{n} is {have.get(n)} there, {want.get(n)} here" for n in bad))
    for site in range(cfg.federation.num_sites):
        path = run_dir / "state" / f"site_{site}_round_{rnd}.safetensors"
        _, meta = load_tensors(path)  # missing or corrupt: raises naming the file
        if meta.get("round") != rnd or meta.get("site") != site:
            raise ValueError(f"resume: {path} holds site {meta.get('site')} round {meta.get('round')}, "
                             f"expected site {site} round {rnd}")
