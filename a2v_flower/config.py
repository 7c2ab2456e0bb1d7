"""Compose, validate and translate the Hydra config: the one module that reads `cfg` keys."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from a2v_flower.data.partition import MODES
from a2v_flower.data.site import DataSpec, PartitionSpec
from a2v_flower.data.synthetic import SyntheticSpec
from a2v_flower.models.generators import GeneratorSpec, generator_keys
from a2v_flower.server_generator import ServerGeneratorSpec
from a2v_flower.replay import ReplaySpec, check_reset_layers, default_groups
from a2v_flower.models.audio_encoder import AudioEncoderSpec, patch_tokens
from a2v_flower.names import safe_name
from a2v_flower.models.text_encoders import TextSpec
from a2v_flower.training import TrainSpec

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

ALLOWED = {
    "strategy.aggregation": ("avg", "uniform", "none", "kd"),
    "generator.type": ("none", "gaussian", "vae", "cvae", "gan"),
    "granularity.granularity": ("unified", "per_class", "per_group"),
    "diffusion.type": ("sd", "flux"),
    "model.profile": ("tiny", "pretrained"),
    "data.kind": ("synthetic", "esc50"),
    "partition.mode": MODES,
    "wandb.mode": ("offline", "online", "disabled"),
    "evaluate.split": ("val", "test"),
    "diffusion.dtype": ("float32", "float16", "bfloat16"),
    "sharing.mode": ("none", "averaged", "sequential"),
}
POSITIVE = ("num_rounds", "federation.num_sites", "federation.num_cpus", "train.local_epochs",
            "train.batch_size", "train.lr", "adapter.width", "adapter.heads", "model.audio.tokens",
            "model.audio.batch_size", "data.clip_seconds", "federation.timeout", "diffusion.steps",
            "diffusion.height", "diffusion.width")
NON_NEGATIVE = ("replay.samples_per_class", "replay.refine_epochs", "replay.synthetic_samples_per_class",
                "replay.kd_epochs", "reset.every_rounds", "server_generator.epochs", "diffusion.clip_images", "diffusion.render_every", "diffusion.guidance_scale", "train.weight_decay", "train.cosine_weight", "train.grad_clip", "federation.num_gpus")


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra command-line style overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def load_config(run_config: dict) -> DictConfig:
    """Config of a Flower run: the resolved `config-file` if given, else conf/ composed with `overrides`."""
    path = str(run_config.get("config-file", "") or "")
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"run config config-file={path!r} does not exist")
        return OmegaConf.load(path)
    return compose_config(shlex.split(str(run_config.get("overrides", "") or "")))


def absolute_paths(cfg: DictConfig, base: str | Path) -> DictConfig:
    """Resolve interpolations and make every path absolute against `base` (processes differ in cwd)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("paths.output_root", "paths.cache_dir", "data.root", "generator_checkpoint.dir", "resume"):
        value = OmegaConf.select(cfg, key)
        if value not in (None, "???"):
            OmegaConf.update(cfg, key, str((Path(base) / value).resolve()))
    return cfg


def validate(cfg: DictConfig) -> None:
    """Raise ValueError naming the key, the bad value and what is allowed, before any work starts."""
    for key, allowed in ALLOWED.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not allowed; expected one of {list(allowed)}")
    for key in POSITIVE + NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        bad = not isinstance(value, (int, float)) or isinstance(value, bool)
        if bad or (value <= 0 if key in POSITIVE else value < 0):
            need = "> 0" if key in POSITIVE else ">= 0"
            raise ValueError(f"{key}={value!r} is not allowed; expected a number {need}")
    if not isinstance(cfg.federation.num_cpus, int):
        raise ValueError(f"federation.num_cpus={cfg.federation.num_cpus!r}: Flower needs a whole number of CPUs")
    if cfg.adapter.width % cfg.adapter.heads:
        raise ValueError(f"adapter.width={cfg.adapter.width} must be divisible by adapter.heads={cfg.adapter.heads}")
    gen = cfg.generator.type
    if gen == "vae" and cfg.granularity.granularity != "per_class":
        raise ValueError(f"generator.type='vae' is unconditioned, so granularity={cfg.granularity.granularity!r} "
                         "cannot sample a given class; use granularity=per_class or generator=cvae|gan|gaussian")
    server_gen = cfg.server_generator.epochs > 0
    if cfg.strategy.aggregation == "kd" and gen == "none" and not server_gen:
        raise ValueError("strategy.aggregation='kd' distils on generator samples but generator.type='none' and "
                         "server_generator.epochs=0; choose generator=gaussian|vae|cvae|gan or server_generator.epochs=N")
    if gen == "none" and cfg.replay.refine_epochs and not server_gen:
        raise ValueError("replay.refine_epochs needs generator samples but generator.type='none' and "
                         "server_generator.epochs=0; choose generator=gaussian|vae|cvae|gan or server_generator.epochs=N")
    if gen == "none" and cfg.replay.synthetic_samples_per_class:
        raise ValueError("replay.synthetic_samples_per_class sends the sites' generator samples but "
                         "generator.type='none'; choose generator=gaussian|vae|cvae|gan")
    if server_gen and not (cfg.strategy.aggregation == "kd" or cfg.replay.refine_epochs):
        raise ValueError(f"server_generator.epochs={cfg.server_generator.epochs} but nothing uses its samples; "
                         "set strategy=kd or replay.refine_epochs > 0 (or server_generator.epochs=0)")
    if gen == "none" and (cfg.mode.generator_only_mode or cfg.mode.use_pretrained_generators):
        raise ValueError(f"mode generator_only_mode={cfg.mode.generator_only_mode} / use_pretrained_generators="
                         f"{cfg.mode.use_pretrained_generators} need a generator but generator.type='none'")
    if cfg.sharing.mode != "none" and gen == "none":
        raise ValueError(f"sharing.mode={cfg.sharing.mode!r} shares generators but generator.type='none'; "
                         "choose generator=gaussian|vae|cvae|gan or sharing=none")
    most = 1 + patch_tokens(audio_spec(cfg))  # the summary token + at most one token per AST patch
    if not 2 <= cfg.model.audio.tokens <= most:
        raise ValueError(f"model.audio.tokens={cfg.model.audio.tokens} is not allowed; the compact representation "
                         f"has a summary token and 1..{most - 1} pooled patch tokens: expected 2..{most} "
                         f"(model.audio.max_length={cfg.model.audio.max_length})")
    for key in ("name", "generator_checkpoint.base_name"):  # both become parts of file names
        safe_name(OmegaConf.select(cfg, key), key)
    if "{}" not in cfg.prompt_template:
        raise ValueError(f"prompt_template={cfg.prompt_template!r} must contain '{{}}' for the class name")
    splits = dict(cfg.data.splits)
    if set(splits) != {"train", "val", "test"} or abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"data.splits={splits} must have train, val and test fractions summing to 1")
    for part, frac in splits.items():
        if not 0 <= frac <= 1:
            raise ValueError(f"data.splits.{part}={frac} is not allowed; expected a fraction in [0, 1]")
    check_federation(cfg)
    if cfg.data.kind == "esc50" and OmegaConf.select(cfg, "data.root") in (None, "???"):
        raise ValueError("data.root is required for data=esc50: set data.root=/path/to/ESC-50 "
                         "(the folder with audio/ and meta/esc50.csv) or export ESC50_ROOT")


def check_federation(cfg: DictConfig) -> None:
    """Sampling fractions in (0, 1] and `federation.min_sites` (null = all) in 1..num_sites."""
    n = cfg.federation.num_sites
    for key in ("strategy.fraction_train", "strategy.fraction_evaluate"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{key}={value!r} is not allowed; expected a fraction in (0, 1] of the "
                             f"federation.num_sites={n} sites (each round samples max(1, round({n} x fraction)))")
    low = OmegaConf.select(cfg, "federation.min_sites")
    if low is not None and (isinstance(low, bool) or not isinstance(low, int) or not 1 <= low <= n):
        raise ValueError(f"federation.min_sites={low!r} is not allowed; expected null (all sites) or a whole "
                         f"number in 1..federation.num_sites={n}")


def min_sites(cfg: DictConfig) -> int:
    """Fewest sites a round may finish with (federation.min_sites; null = every site)."""
    low = OmegaConf.select(cfg, "federation.min_sites")
    return cfg.federation.num_sites if low is None else int(low)


def check_gpus(num_gpus: float) -> None:
    """A GPU fraction on a machine without CUDA fails inside Ray with 'ActorPool is empty': say why first."""
    import torch

    if num_gpus > 0 and not torch.cuda.is_available():
        raise ValueError(f"federation.num_gpus={num_gpus} but this machine has no CUDA GPU; "
                         "use federation.num_gpus=0 here")


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
    return DataSpec(cache_dir=cfg.paths.cache_dir, root=d.root,
                    classes=tuple(d.classes) if d.classes else None,
                    folds=tuple(d.folds) if d.get("folds") else None, clip_seconds=d.clip_seconds,
                    splits=tuple(dict(d.splits).items()), synthetic=synthetic, seed=cfg.seed)


def partition_spec(cfg: DictConfig) -> PartitionSpec:
    """Partition spec from `partition.*` and `federation.num_sites`."""
    p = cfg.partition
    sites = tuple(tuple(s) for s in p.sites) if p.get("sites") else None
    return PartitionSpec(p.mode, cfg.federation.num_sites, sites, p.get("alpha", 0.5), cfg.seed)


def audio_spec(cfg: DictConfig) -> AudioEncoderSpec:
    """Audio encoder spec from `model.audio.*`."""
    a = cfg.model.audio
    tiny = tuple(sorted(dict(a.tiny).items())) if a.get("tiny") else None
    return AudioEncoderSpec(a.name_or_path, a.sampling_rate, a.max_length, a.tokens, a.batch_size, tiny, cfg.seed)


def text_spec(cfg: DictConfig) -> TextSpec:
    """Text encoder spec from `model.text.*`."""
    t = cfg.model.text
    return TextSpec(t.clip, t.clip_subfolder, t.t5, t.t5_subfolder, cfg.seed)


def train_spec(cfg: DictConfig) -> TrainSpec:
    """Optimisation spec from `train.*`."""
    t = cfg.train
    return TrainSpec(t.local_epochs, t.batch_size, t.lr, t.weight_decay, t.cosine_weight, t.grad_clip)


def t5_seq_len(cfg: DictConfig) -> int:
    """FLUX T5 sequence length (unused for SD)."""
    return int(cfg.diffusion.get("t5_seq_len", 16))


def diffusion_spec(cfg: DictConfig):
    """Rendering pipeline spec from `diffusion.*` (diffusers is imported only where images are made)."""
    from a2v_flower.diffusion import DiffusionSpec

    d = cfg.diffusion
    return DiffusionSpec(d.type, d.name_or_path, d.steps, d.guidance_scale, d.height, d.width, cfg.seed, d.dtype,
                         d.cpu_offload, d.attention_slicing)


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


def replay_spec(cfg: DictConfig, classes: list[str]) -> ReplaySpec | None:
    """Generator use from `generator.*`, `granularity.*`, `replay.*`; None without generators.

    Validates the groups against `classes` (a class in two groups, in none, or unknown: ValueError).
    """
    g = cfg.generator
    if g.type == "none":
        return None
    spec = GeneratorSpec(g.type, g.latent_dim, g.hidden, g.lr, g.weight_decay, g.epochs, g.batch_size, g.grad_clip,
                         g.kl_weight, g.kl_warmup, g.early_stopping_patience, cfg.seed)
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
                      ck.frequency, cfg.reset.every_rounds, layers)
