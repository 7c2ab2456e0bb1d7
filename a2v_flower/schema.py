"""The config's schema: one dataclass per conf/config.yaml node, in Hydra's ConfigStore. Types live here (a wrong key
or type fails at compose time), values in the YAML (`???`), rules in `__post_init__` (naming key, value, allowed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the YAML whose types this module holds


def _numbers(node: str, obj, positive: tuple = (), non_negative: tuple = (), fraction: tuple = ()) -> None:
    """ValueError naming `node.name` unless each `positive` field is > 0, `non_negative` >= 0, `fraction` in [0, 1]."""
    rules = ((positive, "a number > 0", lambda v: v > 0), (non_negative, "a number >= 0", lambda v: v >= 0),
             (fraction, "a fraction in [0, 1]", lambda v: 0 <= v <= 1))
    for names, want, ok in rules:
        for n in names:
            if not ok(getattr(obj, n)):
                raise ValueError(f"{node}{n}={getattr(obj, n)!r} is not allowed; expected {want}")


def _one_of(key: str, value, allowed: tuple) -> None:
    """ValueError naming `key` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; expected one of {list(allowed)}")


@dataclass
class Splits:
    train: float = MISSING
    val: float = MISSING
    test: float = MISSING

    def __post_init__(self):
        parts = {"train": self.train, "val": self.val, "test": self.test}
        _numbers("data.splits.", self, fraction=tuple(parts))
        if abs(sum(parts.values()) - 1) > 1e-6:
            raise ValueError(f"data.splits={parts} is not allowed; expected fractions summing to 1")
        if self.train == 0:
            raise ValueError("data.splits.train=0 is not allowed; sites need training clips")


@dataclass
class Data:
    kind: str = MISSING               # synthetic | esc50
    root: Optional[str] = None
    classes: Optional[list[str]] = None
    folds: Optional[list[int]] = None
    clip_seconds: float = MISSING
    splits: Splits = MISSING
    clips_per_class: int = 32         # synthetic only, from here on
    seconds: float = 5.0
    sample_rate: int = 22050
    noise: float = 0.6
    overlap: float = 0.5
    variation: float = 0.25

    def __post_init__(self):
        _one_of("data.kind", self.kind, ("synthetic", "esc50"))
        _numbers("data.", self, positive=("clip_seconds", "clips_per_class", "seconds", "sample_rate"), non_negative=("noise", "variation"), fraction=("overlap",))
        if self.kind == "esc50" and self.root in (None, "???"):
            raise ValueError("data.root is required for data=esc50: set data.root=/path/to/ESC-50 (the folder with audio/ and meta/esc50.csv) or export ESC50_ROOT")


@dataclass
class Partition:
    mode: str = MISSING               # classes | groups | iid | dirichlet
    sites: Optional[list[list[str]]] = None
    alpha: float = 0.5

    def __post_init__(self):
        _one_of("partition.mode", self.mode, ("classes", "groups", "iid", "dirichlet"))
        _numbers("partition.", self, positive=("alpha",))


@dataclass
class Audio:
    name_or_path: Optional[str] = None
    sampling_rate: int = MISSING
    max_length: int = MISSING
    tokens: int = MISSING
    batch_size: int = MISSING
    tiny: Any = None                  # ASTConfig overrides of the tiny model, e.g. {hidden_size: 64}

    def __post_init__(self):
        from a2v_flower.models.audio_encoder import AudioEncoderSpec, patch_tokens
        _numbers("model.audio.", self, positive=("sampling_rate", "max_length", "batch_size"))
        most = 1 + patch_tokens(AudioEncoderSpec(None, max_length=self.max_length,
                                                 tiny=tuple((self.tiny or {}).items())))
        if not 2 <= self.tokens <= most:  # the summary token + at most one token per AST patch
            raise ValueError(f"model.audio.tokens={self.tokens} is not allowed; the compact representation has a summary token "
                             f"and 1..{most - 1} pooled patch tokens: expected 2..{most} (model.audio.max_length={self.max_length})")


@dataclass
class Text:
    clip: Optional[str] = None
    clip_subfolder: str = ""
    t5: Optional[str] = None
    t5_subfolder: str = ""


@dataclass
class Model:
    profile: str = MISSING            # tiny | pretrained
    audio: Audio = MISSING
    text: Text = MISSING

    def __post_init__(self):
        _one_of("model.profile", self.profile, ("tiny", "pretrained"))


@dataclass
class Diffusion:
    type: str = MISSING               # sd | flux
    render_every: int = MISSING
    name_or_path: Optional[str] = None
    steps: int = MISSING
    height: int = MISSING
    width: int = MISSING
    dtype: str = "float32"
    cpu_offload: bool = False
    attention_slicing: bool = False
    clip_images: int = 0
    free_after_render: bool = True
    judge: Optional[str] = None
    guidance_scale: float = MISSING
    clip_seq_len: int = 77            # sd: fixed by CLIP; kept so that older runs' config.yaml loads
    t5_seq_len: int = 16              # flux

    def __post_init__(self):
        from a2v_flower.models.text_encoders import CLIP_SEQ_LEN  # SD's CLIP text states: 77 positions
        _one_of("diffusion.type", self.type, ("sd", "flux"))
        _one_of("diffusion.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        _one_of("diffusion.clip_seq_len", self.clip_seq_len, (CLIP_SEQ_LEN,))
        _numbers("diffusion.", self, positive=("steps", "height", "width", "t5_seq_len"), non_negative=("render_every", "clip_images", "guidance_scale"))


@dataclass
class Strategy:
    aggregation: str = MISSING        # avg | uniform | none | kd
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0

    def __post_init__(self):
        _one_of("strategy.aggregation", self.aggregation, ("avg", "uniform", "none", "kd"))
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"strategy.{name}={getattr(self, name)!r} is not allowed; expected a fraction in (0, 1]")


@dataclass
class Generator:
    type: str = MISSING               # none | gaussian | vae | cvae | gan
    latent_dim: int = 16
    hidden: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    batch_size: int = 32
    grad_clip: float = 1.0
    kl_weight: float = 1e-2
    kl_warmup: float = 0.5
    early_stopping_patience: int = 0
    covariance: str = "diag"          # gaussian: diag | lowrank | full
    rank: int = 16                    # gaussian lowrank: rank of the factor
    dp_epsilon: Optional[float] = None  # gaussian: DP release of each class's statistics (null = off)
    dp_clip: Optional[float] = None   # with dp_epsilon: L2 bound of each flattened embedding (null = sqrt(K*D))

    def __post_init__(self):
        _one_of("generator.type", self.type, ("none", "gaussian", "vae", "cvae", "gan"))
        _one_of("generator.covariance", self.covariance, ("diag", "lowrank", "full"))
        _numbers("generator.", self, positive=("latent_dim", "hidden", "lr", "epochs", "batch_size", "rank"),
                 non_negative=("weight_decay", "grad_clip", "kl_weight", "early_stopping_patience"), fraction=("kl_warmup",))
        for k in ("dp_epsilon", "dp_clip"):
            if getattr(self, k) is not None and not (getattr(self, k) > 0 and self.type == "gaussian"):
                raise ValueError(f"generator.{k}={getattr(self, k)!r} is not allowed; expected null or > 0, with generator=gaussian")


@dataclass
class Granularity:
    granularity: str = MISSING        # unified | per_class | per_group
    groups: Any = None                # {group: [classes]}; checked against the classes by generator_keys

    def __post_init__(self):
        _one_of("granularity.granularity", self.granularity, ("unified", "per_class", "per_group"))


@dataclass
class Mode:
    generator_training_mode: bool = MISSING
    generator_only_mode: bool = MISSING
    use_pretrained_generators: bool = MISSING


@dataclass
class Sharing:
    mode: str = MISSING               # none | averaged | sequential

    def __post_init__(self):
        _one_of("sharing.mode", self.mode, ("none", "averaged", "sequential"))


@dataclass
class Reset:
    reset_generator_on_class_change: bool = MISSING
    every_rounds: int = 0
    layers: list[str] = field(default_factory=list)

    def __post_init__(self):
        _numbers("reset.", self, non_negative=("every_rounds",))


@dataclass
class Federation:
    num_sites: int = MISSING
    num_cpus: int = MISSING
    num_gpus: float = MISSING
    timeout: float = MISSING
    min_sites: Optional[int] = None
    even_load: bool = MISSING

    def __post_init__(self):
        _numbers("federation.", self, positive=("num_sites", "num_cpus", "timeout"), non_negative=("num_gpus",))
        if self.min_sites is not None and not 1 <= self.min_sites <= self.num_sites:
            raise ValueError(f"federation.min_sites={self.min_sites!r} is not allowed; expected null (all sites) or a whole number in 1..federation.num_sites={self.num_sites}")


@dataclass
class Adapter:
    width: int = MISSING
    heads: int = MISSING
    kind: str = MISSING
    rank: int = MISSING
    wire: str = MISSING

    def __post_init__(self):
        _numbers("adapter.", self, positive=("width", "heads", "rank"))
        _one_of("adapter.kind", self.kind, ("attention", "lowrank"))
        _one_of("adapter.wire", self.wire, ("float32", "float16"))  # numpy, which Flower's arrays use, has no bfloat16
        if self.width % self.heads:
            raise ValueError(f"adapter.width={self.width} must be divisible by adapter.heads={self.heads}")


@dataclass
class Train:
    local_epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    cosine_weight: float = MISSING
    grad_clip: float = MISSING
    loss: str = MISSING
    temperature: float = MISSING
    proximal_mu: float = MISSING
    absent_scale: float = MISSING

    def __post_init__(self):
        _numbers("train.", self, positive=("local_epochs", "batch_size", "lr", "temperature"),
                 non_negative=("weight_decay", "cosine_weight", "grad_clip", "proximal_mu", "absent_scale"))
        _one_of("train.loss", self.loss, ("mse", "contrastive", "mse+contrastive"))
        if self.absent_scale > 1 or (self.absent_scale != 1 and self.loss == "mse"):
            raise ValueError(f"train.absent_scale={self.absent_scale!r} is not allowed with train.loss={self.loss!r}; expected a number in [0, 1] and a loss with a contrastive term")


@dataclass
class Replay:
    samples_per_class: int = MISSING
    refine_epochs: int = MISSING
    synthetic_samples_per_class: int = MISSING
    kd_epochs: int = MISSING

    def __post_init__(self):
        _numbers("replay.", self, non_negative=("samples_per_class", "refine_epochs", "synthetic_samples_per_class", "kd_epochs"))


@dataclass
class ServerGenerator:
    epochs: int = MISSING
    hidden: int = MISSING
    latent_dim: int = MISSING
    lr: float = MISSING
    batch_per_class: int = MISSING
    moment_weight: float = MISSING

    def __post_init__(self):
        _numbers("server_generator.", self, positive=("hidden", "latent_dim", "lr", "batch_per_class"), non_negative=("epochs", "moment_weight"))


@dataclass
class GeneratorCheckpoint:
    dir: str = MISSING
    base_name: str = MISSING
    frequency: int = MISSING
    save: bool = True                 # the seed's generator_save_checkpoint

    def __post_init__(self):
        _numbers("generator_checkpoint.", self, non_negative=("frequency",))


@dataclass
class Evaluate:
    split: str = MISSING

    def __post_init__(self):
        _one_of("evaluate.split", self.split, ("val", "test"))


@dataclass
class Paths:
    output_root: str = MISSING
    cache_dir: str = MISSING
    run_dir: Optional[str] = None     # set by the ServerApp: the run folder sites keep their state under


@dataclass
class Wandb:
    mode: str = MISSING
    project: str = MISSING
    name: str = MISSING
    group: Optional[str] = None

    def __post_init__(self):
        _one_of("wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class Config:
    """The whole config; `__post_init__` holds the rules that span several nodes."""

    data: Data = MISSING
    partition: Partition = MISSING
    model: Model = MISSING
    diffusion: Diffusion = MISSING
    strategy: Strategy = MISSING
    generator: Generator = MISSING
    granularity: Granularity = MISSING
    mode: Mode = MISSING
    sharing: Sharing = MISSING
    reset: Reset = MISSING
    name: str = MISSING
    seed: int = MISSING
    num_rounds: int = MISSING
    prompt_template: str = MISSING
    schedule: Any = None              # {site: [{from_round, classes}]}; checked by data.schedule.check_schedule
    resume: Optional[str] = None
    federation: Federation = MISSING
    adapter: Adapter = MISSING
    train: Train = MISSING
    replay: Replay = MISSING
    server_generator: ServerGenerator = MISSING
    generator_checkpoint: GeneratorCheckpoint = MISSING
    evaluate: Evaluate = MISSING
    paths: Paths = MISSING
    wandb: Wandb = MISSING

    def __post_init__(self):
        from a2v_flower.names import safe_name
        _numbers("", self, positive=("num_rounds",))
        for key, value in (("name", self.name), ("generator_checkpoint.base_name", self.generator_checkpoint.base_name)):
            safe_name(value, key)  # both become parts of file names
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain '{{}}' for the class name")
        gen, server_gen = self.generator.type, self.server_generator.epochs > 0
        if gen == "vae" and self.granularity.granularity != "per_class":
            raise ValueError(f"generator.type='vae' is unconditioned, so granularity={self.granularity.granularity!r} "
                             "cannot sample a given class; use granularity=per_class or generator=cvae|gan|gaussian")
        needs = "choose generator=gaussian|vae|cvae|gan or server_generator.epochs=N"
        if self.strategy.aggregation == "kd" and gen == "none" and not server_gen:
            raise ValueError("strategy.aggregation='kd' distils on generator samples but generator.type='none' and "
                             f"server_generator.epochs=0; {needs}")
        if gen == "none" and self.replay.refine_epochs and not server_gen:
            raise ValueError("replay.refine_epochs needs generator samples but generator.type='none' and "
                             f"server_generator.epochs=0; {needs}")
        if gen == "none" and self.replay.synthetic_samples_per_class:
            raise ValueError("replay.synthetic_samples_per_class sends the sites' generator samples but generator.type='none'; choose generator=gaussian|vae|cvae|gan")
        if server_gen and not (self.strategy.aggregation == "kd" or self.replay.refine_epochs):
            raise ValueError(f"server_generator.epochs={self.server_generator.epochs} but nothing uses its samples; "
                             "set strategy=kd or replay.refine_epochs > 0 (or server_generator.epochs=0)")
        if gen == "none" and (self.mode.generator_only_mode or self.mode.use_pretrained_generators):
            raise ValueError(f"mode generator_only_mode={self.mode.generator_only_mode} / use_pretrained_generators="
                             f"{self.mode.use_pretrained_generators} need a generator but generator.type='none'")
        if gen == "none" and self.sharing.mode != "none":
            raise ValueError(f"sharing.mode={self.sharing.mode!r} shares generators but generator.type='none'; "
                             "choose generator=gaussian|vae|cvae|gan or sharing=none")
        if self.generator.dp_epsilon is not None and self.sharing.mode == "sequential":  # a class is released once
            raise ValueError(f"generator.dp_epsilon={self.generator.dp_epsilon} is not allowed with sharing.mode='sequential' (a site would skip a class an earlier one released); use sharing=none|averaged")


ConfigStore.instance().store(name="schema", node=Config)


def check(cfg: DictConfig) -> Config:
    """The config as typed objects: types and keys checked against the schema, then every rule run."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # keys added with `+key=` are checked too
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), plain))
