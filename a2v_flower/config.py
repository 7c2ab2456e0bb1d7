"""Compose, validate and translate the Hydra config: the one module that reads `cfg` keys."""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from a2v_flower import devices, schema
from a2v_flower.schema import CONF_DIR
from a2v_flower.data.esc50 import ESC50_GROUPS
from a2v_flower.data.hf import HFSpec
from a2v_flower.data.site import DataSpec, PartitionSpec
from a2v_flower.data.synthetic import SyntheticSpec
from a2v_flower.models.audio_encoder import AudioEncoderSpec
from a2v_flower.models.generators import GeneratorSpec, ReplaySpec, generator_keys
from a2v_flower.models.generators.stats import ServerGeneratorSpec
from a2v_flower.site_generators import check_reset_layers
from a2v_flower.models.text_encoders import TextSpec
from a2v_flower.training import TrainSpec

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


def validate(cfg: DictConfig) -> None:
    """Raise ValueError naming the key, the bad value and what is allowed, before any work starts.

    The rules live beside their fields in `a2v_flower.schema`; a config loaded from a file is checked
    against the schema's types and keys here too.
    """
    try:  # the config as typed objects: types and keys checked against the schema, then every rule run
        plain = OmegaConf.create(OmegaConf.to_container(cfg))  # keys added with `+key=` are checked too
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema.Config), plain))
    except OmegaConfBaseException as err:  # unknown key, wrong type, missing value
        msg = str(err.msg).strip().splitlines()[0]
        raise ValueError(f"{err.full_key}: {msg}" if getattr(err, "full_key", None) else msg) from None


def min_sites(cfg: DictConfig) -> int:
    """Fewest sites a round may finish with (federation.min_sites; null = every site)."""
    low = OmegaConf.select(cfg, "federation.min_sites")
    return cfg.federation.num_sites if low is None else int(low)


def check_gpus(num_gpus: float) -> None:
    """A GPU fraction on a machine without CUDA fails inside Ray with 'ActorPool is empty': say why first."""
    if num_gpus > 0 and not devices.cuda_count():
        raise ValueError(f"federation.num_gpus={num_gpus} but this machine has no CUDA GPU; "
                         "use federation.num_gpus=0 here")


def check_devices(cfg: DictConfig) -> None:
    """A simulation on this machine: its GPUs suit federation.num_gpus and the device keys, and no float16/bfloat16
    model, pipeline or CPU offload lands on a CPU (sites: in Ray's actors; the server: in Ray's driver)."""
    f, d = cfg.federation.num_gpus, cfg.diffusion
    check_gpus(f)
    if 0 < f < 1 and (per := devices.actors_per_gpu(f)) < round(1 / f):  # legal, but not what it says
        log.warning("federation.num_gpus=%s puts %d sites on a GPU, not %d (Flower receives it as a 32-bit float); "
                    "a fraction such as 0.25 or 0.125 gives the count it says", f, per, round(1 / f))
    site = devices.site_device_class(cfg.device.site, f)
    devices.check_placement(site, cfg.model.audio.dtype, d.dtype if d.clip_images and d.render_every else None,
                            who=f"a site (device.site={cfg.device.site!r}, federation.num_gpus={f})")
    server = server_device(cfg).type
    devices.check_placement(server, diffusion_dtype=d.dtype if d.render_every else None,
                            cpu_offload=d.cpu_offload and bool(d.render_every),
                            who=f"the server (device.server={cfg.device.server!r})")


def site_device(cfg: DictConfig) -> torch.device:
    """The device of every model of a site in this process (device.site; auto: the GPU Ray handed it, else CPU)."""
    return devices.resolve(OmegaConf.select(cfg, "device.site", default="auto"), "device.site")


def server_device(cfg: DictConfig) -> torch.device:
    """The device of the ServerApp's models and of a2v-generate (device.server; auto: the first GPU, else CPU)."""
    return devices.resolve(OmegaConf.select(cfg, "device.server", default="auto"), "device.server")


def run_dir_for(cfg: DictConfig) -> Path:
    """A fresh run folder <output_root>/<date>/<time>_<name>."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(cfg.paths.output_root) / f"{stamp}_{cfg.name}"


# ---- config -> typed specs (modules below never see cfg) ---------------------------------------

def data_spec(cfg: DictConfig) -> DataSpec:
    """Dataset spec from `data.*`."""
    d = cfg.data
    synthetic = None
    if d.kind == "synthetic":
        synthetic = SyntheticSpec(tuple(d.classes), d.clips_per_class, d.seconds, d.sample_rate,
                                  d.noise, d.overlap, d.variation, cfg.seed)
    hf = None
    if d.kind == "hf":
        hf = HFSpec(d.path, tuple(d.hf_splits) if d.hf_splits else None, d.audio_column, d.label_column, d.group_column)
    return DataSpec(cache_dir=cfg.paths.cache_dir, root=d.root,
                    classes=tuple(d.classes) if d.classes else None,
                    folds=tuple(d.folds) if d.get("folds") else None, clip_seconds=d.clip_seconds,
                    splits=tuple(dict(d.splits).items()), synthetic=synthetic, hf=hf, seed=cfg.seed,
                    duplicates=d.get("duplicates", "drop"))  # absent from configs saved before it existed


def partition_spec(cfg: DictConfig) -> PartitionSpec:
    """Partition spec from `partition.*` and `federation.num_sites`."""
    p = cfg.partition
    sites = tuple(tuple(s) for s in p.sites) if p.get("sites") else None
    held = cfg.evaluate.server_share if cfg.evaluate.get("mode", "federated") == "server" else 0.0
    return PartitionSpec(p.mode, cfg.federation.num_sites, sites, p.get("alpha", 0.5), cfg.seed,
                         p.get("min_partition_size", 0), p.get("classes_per_site", 2), p.get("shards_per_site", 2),
                         held, p.get("clips_per_site", 4))


def audio_spec(cfg: DictConfig) -> AudioEncoderSpec:
    """Audio encoder spec from `model.audio.*`."""
    a = cfg.model.audio
    tiny = tuple(sorted(dict(a.tiny).items())) if a.get("tiny") else None
    return AudioEncoderSpec(a.name_or_path, a.sampling_rate, a.max_length, a.tokens, a.batch_size, tiny, cfg.seed,
                            a.get("dtype", "float32"))  # a run saved before model.audio.dtype: float32


def text_spec(cfg: DictConfig) -> TextSpec:
    """Text encoder spec from `model.text.*`."""
    t = cfg.model.text
    return TextSpec(t.clip, t.clip_subfolder, t.t5, t.t5_subfolder, cfg.seed)


def train_spec(cfg: DictConfig) -> TrainSpec:
    """Optimisation spec from `train.*`."""
    t = cfg.train
    return TrainSpec(t.local_epochs, t.batch_size, t.lr, t.weight_decay, t.cosine_weight, t.grad_clip, t.loss,
                     t.temperature, t.proximal_mu, t.absent_scale)


def t5_seq_len(cfg: DictConfig) -> int:
    """FLUX T5 sequence length (unused for SD)."""
    return int(cfg.diffusion.get("t5_seq_len", 16))


def diffusion_spec(cfg: DictConfig, device: torch.device):
    """Rendering pipeline spec from `diffusion.*`, on `device` (diffusers is imported only where images are made)."""
    from a2v_flower.diffusion import DiffusionSpec

    d = cfg.diffusion
    return DiffusionSpec(d.type, d.name_or_path, d.steps, d.guidance_scale, d.height, d.width, cfg.seed, d.dtype,
                         d.cpu_offload, d.attention_slicing, str(device))


def server_generator_spec(cfg: DictConfig) -> ServerGeneratorSpec | None:
    """The server's own generator (conf: server_generator.*); None when server_generator.epochs=0."""
    g, r = cfg.server_generator, cfg.replay
    if not g.epochs:
        return None
    return ServerGeneratorSpec(g.epochs, g.hidden, g.latent_dim, g.lr, g.batch_per_class, g.moment_weight,
                               r.samples_per_class, r.refine_epochs, r.kd_epochs)


def schedule_of(cfg: DictConfig) -> dict | None:
    """`schedule` as {site id: [{from_round, classes}]} (site ids given as strings become ints); None if unset."""
    sched = OmegaConf.select(cfg, "schedule")
    if not sched:
        return None
    sched = OmegaConf.to_container(sched)
    return {int(k) if str(k).isdigit() else k: v for k, v in sched.items()}


def default_groups(classes: list[str]) -> dict[str, list[str]]:
    """ESC-50's semantic groups restricted to `classes` (empty groups dropped)."""
    groups = {g: [c for c in members if c in classes] for g, members in ESC50_GROUPS.items()}
    return {g: m for g, m in groups.items() if m}


def replay_spec(cfg: DictConfig, classes: list[str]) -> ReplaySpec | None:
    """Generator use from `generator.*`, `granularity.*`, `replay.*`; None without generators.

    Validates the groups against `classes` (a class in two groups, in none, or unknown: ValueError).
    """
    g = cfg.generator
    if g.type == "none":
        return None
    spec = GeneratorSpec(g.type, g.latent_dim, g.hidden, g.lr, g.weight_decay, g.epochs, g.batch_size, g.grad_clip,
                         g.kl_weight, g.kl_warmup, g.early_stopping_patience, cfg.seed, g.covariance, g.rank,
                         g.dp_epsilon, g.dp_clip)
    gran = cfg.granularity.granularity
    groups = OmegaConf.to_container(cfg.granularity.groups) if cfg.granularity.groups else None
    if gran == "per_group" and groups is None:
        groups = default_groups(classes)
    generator_keys(gran, classes, groups)
    layers = tuple(cfg.reset.layers or ())
    check_reset_layers(spec, layers)
    r, m, ck = cfg.replay, cfg.mode, cfg.generator_checkpoint
    return ReplaySpec(spec, gran, groups, r.samples_per_class, r.refine_epochs, r.synthetic_samples_per_class,
                      r.kd_epochs, cfg.reset.reset_generator_on_class_change, m.generator_training_mode,
                      m.generator_only_mode, m.use_pretrained_generators, cfg.sharing.mode, ck.dir, ck.base_name,
                      ck.frequency, cfg.reset.every_rounds, layers, ck.save)
