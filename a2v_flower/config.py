"""From YAML to the typed config: compose (Hydra), check (the schema's rules) and hand out `schema.Config`, whose
nodes are the specs the code takes (`conf.train` is the `TrainSpec` of `train_adapters`). The one module that
reads the untyped tree (DictConfig); the few specs that span several nodes are assembled at the bottom."""

from __future__ import annotations

import dataclasses
import functools
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from a2v_flower import devices, schema
from a2v_flower.data.esc50 import ESC50_GROUPS
from a2v_flower.data.hf import HFSpec
from a2v_flower.data.site import DataSpec, PartitionSpec
from a2v_flower.data.synthetic import SyntheticSpec
from a2v_flower.models.generators import ReplaySpec, generator_keys
from a2v_flower.schema import CONF_DIR, Config
from a2v_flower.site_generators import check_reset_layers

log = logging.getLogger(__name__)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra command-line style overrides; a bad override is a ValueError."""
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (ConfigCompositionException, OverrideParseException) as err:
        raise ValueError(describe(err)) from None


def describe(err: Exception) -> str:
    """One line for a Hydra/OmegaConf error: what was refused, and why (the cause's first line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("To append")]
    if len(lines) > 1 and lines[1].startswith("Available options"):  # an unknown group option
        options = lines[2:lines.index("Config search path:")] if "Config search path:" in lines else lines[2:]
        return f"{lines[0]}; {lines[1].rstrip(':')}: {', '.join(options)}"
    cause = err.__cause__
    why = str(getattr(cause, "msg", None) or cause or "").strip().splitlines()
    key = getattr(cause, "full_key", None)
    parts = [lines[0] if lines else type(err).__name__] + [ln for ln in lines[1:] if "full_key" not in ln][:2]
    if why:
        parts.append(f"{key}: {why[0]}" if key else why[0])
    return "; ".join(dict.fromkeys(p.rstrip(".") for p in parts))


# Flower's own run-config keys (pyproject [tool.flwr.app.config]) -> the Hydra keys they set; 0 keeps the Hydra value.
FLOWER_KEYS = {"num-server-rounds": "num_rounds", "fraction-train": "strategy.fraction_train",
               "fraction-evaluate": "strategy.fraction_evaluate", "local-epochs": "train.local_epochs",
               "lr": "train.lr", "batch-size": "train.batch_size"}


def load_config(run_config: dict) -> DictConfig:
    """Config of a Flower run: the resolved `config-file` if given, else conf/ composed with `overrides`;
    then every Flower-style key of FLOWER_KEYS that is not 0 (`--run-config 'num-server-rounds=3'`)."""
    path = str(run_config.get("config-file", "") or "")
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"run config config-file={path!r} does not exist")
    cfg = OmegaConf.load(path) if path else compose_config(shlex.split(str(run_config.get("overrides", "") or "")))
    for flwr_key, key in FLOWER_KEYS.items():
        value = run_config.get(flwr_key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"run config {flwr_key}={value!r} is not allowed; expected a number >= 0 "
                             f"(0 keeps {key} of the Hydra config)")
        if value:
            OmegaConf.update(cfg, key, value)
    return cfg


def absolute_paths(cfg: DictConfig, base: str | Path) -> DictConfig:
    """Resolve interpolations and make every path absolute against `base` (processes differ in cwd)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("paths.output_root", "paths.cache_dir", "data.root", "generator_checkpoint.dir", "resume"):
        value = OmegaConf.select(cfg, key)
        if value not in (None, "???"):
            OmegaConf.update(cfg, key, str((Path(base) / value).resolve()))
    hf = OmegaConf.select(cfg, "data.path")  # a local dataset folder, or else a hub id (kept as given)
    if hf and (Path(base) / hf).exists():
        OmegaConf.update(cfg, "data.path", str((Path(base) / hf).resolve()))
    return cfg


def validate(cfg: DictConfig) -> Config:
    """The typed config: a ValueError naming the key, the bad value and what is allowed, before any work starts.

    Types and keys are checked against the schema, then every rule (beside its field in `a2v_flower.schema`) runs;
    a config loaded from a file is checked the same way.
    """
    try:  # keys added with `+key=` are checked too
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema.Config), plain))
    except OmegaConfBaseException as err:  # unknown key, wrong type, missing value
        msg = str(err.msg).strip().splitlines()[0]
        raise ValueError(f"{err.full_key}: {msg}" if getattr(err, "full_key", None) else msg) from None


def checked(overrides: list[str] | tuple[str, ...], base: str | Path) -> Config:
    """conf/ composed with command-line `overrides`, paths made absolute against `base`, typed and checked."""
    return validate(absolute_paths(compose_config(overrides), base))


def for_federation(run_config: dict, base: str | Path, size: Callable[[int, float], int]) -> Config:
    """A Flower run's typed config, its federation.num_sites set to `size(asked, federation.timeout)`: what the
    connected SuperNodes make of the size the config asks for."""
    cfg = absolute_paths(load_config(run_config), base)
    cfg.federation.num_sites = size(cfg.federation.num_sites, cfg.federation.timeout)
    return validate(cfg)


def for_job(cfg: DictConfig, base: str | Path, override_dirname: str, sweep_group: str | None) -> Config:
    """A Hydra job's typed config: absolute paths, its wandb run named by its overrides unless named by hand, and
    a sweep's runs in one wandb group."""
    cfg = absolute_paths(cfg, base)
    if cfg.wandb.name == cfg.name:
        cfg.wandb.name = override_dirname or cfg.name
    if sweep_group and not cfg.wandb.group:
        cfg.wandb.group = sweep_group
    return validate(cfg)


def as_config(conf: Config | DictConfig) -> Config:
    """`conf` typed: a composed or loaded tree (tests and benchmarks compose one) is checked and typed here."""
    return conf if isinstance(conf, Config) else validate(conf)


def typed(yaml_text: str, local: dict | None = None) -> Config:
    """The typed config of a YAML text (a run's config as messages carry it), with `local` {dotted key: value}
    set first (a SuperNode's own data root or cache folder), checked."""
    cfg = OmegaConf.create(yaml_text)
    for key, value in (local or {}).items():
        OmegaConf.update(cfg, key, value)
    return validate(cfg)


def defaults(*overrides: str) -> Config:
    """conf/ composed with `overrides` and checked: the specs with their one default (for tests, benchmarks)."""
    return validate(compose_config(overrides))


@functools.lru_cache(maxsize=16)
def _defaults(overrides: tuple[str, ...]) -> Config:
    return defaults(*overrides)


def spec(node: str, *overrides: str, **changes):
    """The spec at `node` ("train", "model.audio", "generator", ...) of conf/ composed with `overrides` (e.g.
    "diffusion=flux"), with `changes` checked by its rules: how tests and benchmarks build a spec, so that
    every value has one default, the YAML's."""
    return dataclasses.replace(value(_defaults(tuple(overrides)), node), **changes)


def to_yaml(conf: Config | DictConfig) -> str:
    """The YAML text of a config (what is saved as a run's config.yaml and sent to sites)."""
    return OmegaConf.to_yaml(conf if isinstance(conf, DictConfig) else OmegaConf.structured(conf))


def plain(conf: Config) -> dict:
    """The typed config as plain dicts and lists (what wandb and the tracker record)."""
    return OmegaConf.to_container(OmegaConf.structured(conf))


# What a key a run saved before it existed meant then, where today's default differs (older runs load as they ran).
ABSENT_THEN = {"adapter": {"kind": "attention", "rank": 64, "normalise": False, "token_embedding": False}}


def load_run(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A saved run's config.yaml over today's defaults (a key the run predates takes ABSENT_THEN's value, else
    today's default), with `overrides` ("key=value", the value read as YAML; a key the run's config lacks is a
    ValueError), checked."""
    cfg = OmegaConf.merge(compose_config(), ABSENT_THEN, OmegaConf.load(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or OmegaConf.select(cfg, key, default="???unset") == "???unset":
            raise ValueError(f"override {item!r}: expected key=value with a key of the run's config.yaml")
        OmegaConf.update(cfg, key, yaml.safe_load(text))
    return validate(cfg)


def value(conf: Config, dotted: str):
    """The value at a dotted key of the typed config ('adapter.kind')."""
    for part in dotted.split("."):
        conf = getattr(conf, part)
    return conf


def min_sites(conf: Config | DictConfig) -> int:
    """Fewest sites a round may finish with (federation.min_sites; null = every site)."""
    conf = as_config(conf)
    low = conf.federation.min_sites
    return conf.federation.num_sites if low is None else int(low)


def check_gpus(num_gpus: float) -> None:
    """A GPU fraction on a machine without CUDA fails inside Ray with 'ActorPool is empty': say why first."""
    if num_gpus > 0 and not devices.cuda_count():
        raise ValueError(f"federation.num_gpus={num_gpus} but this machine has no CUDA GPU; "
                         "use federation.num_gpus=0 here")


def check_devices(conf: Config | DictConfig) -> None:
    """A simulation on this machine: its GPUs suit federation.num_gpus and the device keys, and no float16/bfloat16
    model, pipeline or CPU offload lands on a CPU (sites: in Ray's actors; the server: in Ray's driver)."""
    conf = as_config(conf)
    f, d = conf.federation.num_gpus, conf.diffusion
    check_gpus(f)
    if 0 < f < 1 and (per := devices.actors_per_gpu(f)) < round(1 / f):  # legal, but not what it says
        log.warning("federation.num_gpus=%s puts %d sites on a GPU, not %d (Flower receives it as a 32-bit float); "
                    "a fraction such as 0.25 or 0.125 gives the count it says", f, per, round(1 / f))
    site = devices.site_device_class(conf.device.site, f)
    devices.check_placement(site, conf.model.audio.dtype, d.dtype if d.clip_images and d.render_every else None,
                            who=f"a site (device.site={conf.device.site!r}, federation.num_gpus={f})")
    server = server_device(conf).type
    devices.check_placement(server, diffusion_dtype=d.dtype if d.render_every else None,
                            cpu_offload=d.cpu_offload and bool(d.render_every),
                            who=f"the server (device.server={conf.device.server!r})")


def site_device(conf: Config | DictConfig) -> torch.device:
    """The device of every model of a site in this process (device.site; auto: the GPU Ray handed it, else CPU)."""
    conf = as_config(conf)
    return devices.resolve(conf.device.site, "device.site")


def server_device(conf: Config | DictConfig) -> torch.device:
    """The device of the ServerApp's models and of a2v-generate (device.server; auto: the first GPU, else CPU)."""
    conf = as_config(conf)
    return devices.resolve(conf.device.server, "device.server")


def run_dir_for(conf: Config | DictConfig) -> Path:
    """A fresh run folder <output_root>/<date>/<time>_<name>."""
    conf = as_config(conf)
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(conf.paths.output_root) / f"{stamp}_{conf.name}"


def schedule_of(conf: Config | DictConfig) -> dict | None:
    """`schedule` as {site id: [{from_round, classes}]} (site ids given as strings become ints); None if unset."""
    conf = as_config(conf)
    if not conf.schedule:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in dict(conf.schedule).items()}


def adapter_keywords(conf: Config | DictConfig) -> dict:
    """The adapters' architecture as `AdapterSet` and `build_adapters` take it: adapter.* and, with
    adapter.token_embedding, the audio token count it embeds (0: none)."""
    conf = as_config(conf)
    a = conf.adapter
    return {"width": a.width, "heads": a.heads, "kind": a.kind, "rank": a.rank,
            "tokens": conf.model.audio.tokens if a.token_embedding else 0}


# ---- the specs that span several nodes -----------------------------------------------------------------

def data_spec(conf: Config | DictConfig) -> DataSpec:
    """What a site reads: `data.*`, with the cache folder and the seed."""
    conf = as_config(conf)
    d = conf.data
    synthetic = None
    if d.kind == "synthetic":
        synthetic = SyntheticSpec(classes=tuple(d.classes), clips_per_class=d.clips_per_class, seconds=d.seconds,
                                  sample_rate=d.sample_rate, noise=d.noise, overlap=d.overlap,
                                  variation=d.variation, seed=conf.seed)
    hf = None
    if d.kind == "hf":
        hf = HFSpec(path=d.path, splits=tuple(d.hf_splits) if d.hf_splits else None, audio_column=d.audio_column,
                    label_column=d.label_column, group_column=d.group_column)
    return DataSpec(cache_dir=conf.paths.cache_dir, root=d.root, classes=tuple(d.classes) if d.classes else None,
                    folds=tuple(d.folds) if d.folds else None, clip_seconds=d.clip_seconds,
                    splits=(("train", d.splits.train), ("val", d.splits.val), ("test", d.splits.test)),
                    synthetic=synthetic, hf=hf, seed=conf.seed, duplicates=d.duplicates)


def partition_spec(conf: Config | DictConfig) -> PartitionSpec:
    """How clips are dealt to sites: `partition.*`, `federation.num_sites`, and the server's share of every
    class under evaluate.mode=server."""
    conf = as_config(conf)
    p = conf.partition
    held = conf.evaluate.server_share if conf.evaluate.mode == "server" else 0.0
    return PartitionSpec(mode=p.mode, num_sites=conf.federation.num_sites,
                         sites=tuple(tuple(s) for s in p.sites) if p.sites else None, alpha=p.alpha, seed=conf.seed,
                         min_partition_size=p.min_partition_size, classes_per_site=p.classes_per_site,
                         shards_per_site=p.shards_per_site, held_out=held, per_site=p.clips_per_site)


def default_groups(classes: list[str]) -> dict[str, list[str]]:
    """ESC-50's semantic groups restricted to `classes` (empty groups dropped)."""
    groups = {g: [c for c in members if c in classes] for g, members in ESC50_GROUPS.items()}
    return {g: m for g, m in groups.items() if m}


def replay_spec(conf: Config | DictConfig, classes: list[str]) -> ReplaySpec | None:
    """Generator use from `generator.*`, `granularity.*`, `mode.*`, `sharing.*`, `reset.*`,
    `generator_checkpoint.*`; None without generators.

    Validates the groups against `classes` (a class in two groups, in none, or unknown: ValueError).
    """
    conf = as_config(conf)
    g = conf.generator
    if g.type == "none":
        return None
    gran = conf.granularity.granularity
    groups = dict(conf.granularity.groups) if conf.granularity.groups else None
    if gran == "per_group" and groups is None:
        groups = default_groups(classes)
    generator_keys(gran, classes, groups)
    layers = tuple(conf.reset.layers or ())
    check_reset_layers(g, layers)
    m, ck, r = conf.mode, conf.generator_checkpoint, conf.reset
    return ReplaySpec(generator=g, granularity=gran, groups=groups,
                      reset_on_new_classes=r.reset_generator_on_class_change, train=m.generator_training_mode,
                      only=m.generator_only_mode, pretrained=m.use_pretrained_generators, sharing=conf.sharing.mode,
                      checkpoint_dir=ck.dir, checkpoint_base=ck.base_name, checkpoint_frequency=ck.frequency,
                      reset_every=r.every_rounds, reset_layers=layers, checkpoint_save=ck.save)
