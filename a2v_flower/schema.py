"""The config's schema: one dataclass per conf/config.yaml node (Hydra's ConfigStore): types here, values in the YAML,
rules in `__post_init__` (naming key, value, allowed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from a2v_flower.generator_schema import (Generator, GeneratorCheckpoint, Granularity, Mode, Replay, Reset,  # noqa: F401
                                         ServerGenerator, Sharing)
from a2v_flower.resources import CONF_DIR  # the YAML whose types this module holds (the checkout's or the wheel's)
from a2v_flower.rules import device_setting as _device, numbers as _numbers, one_of as _one_of  # torch-free


@dataclass
class Splits:
    train: float = MISSING
    val: float = MISSING
    test: float = MISSING

    def __post_init__(self):
        parts = {"train": self.train, "val": self.val, "test": self.test}
        _numbers("data.splits.", self, positive=("train",), fraction=tuple(parts))  # sites need training clips
        if abs(sum(parts.values()) - 1) > 1e-6:
            raise ValueError(f"data.splits={parts} is not allowed; expected fractions summing to 1")


@dataclass
class Data:
    kind: str = MISSING               # synthetic | esc50 | hf
    root: Optional[str] = None
    path: Optional[str] = None        # hf, from here on: hub id, save_to_disk folder or audiofolder directory
    hf_splits: Optional[list[str]] = None
    audio_column: str = "audio"
    label_column: str = "label"
    group_column: Optional[str] = None
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
    duplicates: str = "drop"          # drop | refuse: clips whose audio repeats an earlier row's

    def __post_init__(self):
        _one_of("data.kind", self.kind, ("synthetic", "esc50", "hf"))
        _one_of("data.duplicates", self.duplicates, ("drop", "refuse"))
        _numbers("data.", self, positive=("clip_seconds", "clips_per_class", "seconds", "sample_rate"),
                 non_negative=("noise", "variation"), fraction=("overlap",))
        need = {"esc50": ("root", "set data.root=/path/to/ESC-50 (the folder with audio/ and meta/esc50.csv) or "
                          "export ESC50_ROOT"), "hf": ("path", "a hub id, a save_to_disk folder or an audiofolder")}
        if self.kind in need and getattr(self, need[self.kind][0]) in (None, "???"):
            raise ValueError(f"data.{need[self.kind][0]} is required for data={self.kind}: {need[self.kind][1]}")


@dataclass
class Partition:
    mode: str = MISSING               # classes | groups | iid | dirichlet | pathological | shards | pool
    sites: Optional[list[list[str]]] = None
    alpha: float = 0.5
    min_partition_size: int = 0
    classes_per_site: int = 2
    shards_per_site: int = 2
    clips_per_site: int = 4           # pool

    def __post_init__(self):
        _one_of("partition.mode", self.mode, ("classes", "groups", "iid", "dirichlet", "pathological", "shards", "pool"))
        _numbers("partition.", self, positive=("alpha", "classes_per_site", "shards_per_site", "clips_per_site"),
                 non_negative=("min_partition_size",))


@dataclass
class Audio:
    name_or_path: Optional[str] = None
    sampling_rate: int = MISSING
    max_length: int = MISSING
    tokens: int = MISSING
    batch_size: int = MISSING
    tiny: Any = None                  # ASTConfig overrides of the tiny model, e.g. {hidden_size: 64}
    dtype: str = "float32"            # float16 | bfloat16 only on a GPU (preflight: devices.check_placement)

    def __post_init__(self):
        from a2v_flower.models.audio_encoder import AudioEncoderSpec, patch_tokens
        _numbers("model.audio.", self, positive=("sampling_rate", "max_length", "batch_size"))
        _one_of("model.audio.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        most = 1 + patch_tokens(AudioEncoderSpec(None, max_length=self.max_length, tiny=tuple((self.tiny or {}).items())))
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
class Device:                         # auto | cpu | cuda | cuda:N; auto: the GPU this process was handed, else CPU
    site: str = "auto"                # every model of a site (a Ray actor sees only the GPU Ray gave it)
    server: str = "auto"              # the ServerApp's models (Ray's driver: it sees every GPU) and a2v-generate

    def __post_init__(self):
        _device("device.site", self.site), _device("device.server", self.server)


@dataclass
class Adapter:
    width: int = MISSING
    heads: int = MISSING
    kind: str = MISSING
    rank: int = MISSING
    wire: str = MISSING
    normalise: bool = True            # standardise inputs with the federation's moments (old configs: absent)
    token_embedding: bool = True      # a learned embedding per audio token index (old configs: absent)

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
class Evaluate:
    split: str = MISSING
    mode: str = "federated"           # federated | server (absent in older configs)
    server_share: float = 0.2

    def __post_init__(self):
        _one_of("evaluate.split", self.split, ("val", "test")), _one_of("evaluate.mode", self.mode, ("federated", "server"))
        if not 0 < self.server_share < 1:
            raise ValueError(f"evaluate.server_share={self.server_share!r} is not allowed; expected a fraction in (0, 1)")


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
    device: Device = field(default_factory=Device)  # a run config saved before devices existed loads as auto
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
        _numbers("", self, positive=("num_rounds",), non_negative=("seed",))
        for key, value in (("name", self.name), ("generator_checkpoint.base_name", self.generator_checkpoint.base_name)):
            safe_name(value, key)  # both become parts of file names
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain '{{}}' for the class name")
        gen, server_gen = self.generator.type, self.server_generator.epochs > 0
        if self.partition.mode == "pool" and self.evaluate.mode != "server":
            raise ValueError("partition.mode='pool' lets sites draw the same clip, so a site's test clip may be "
                             "another's training clip; use evaluate.mode=server (a test set no site holds)")
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


ConfigStore.instance().store(name="schema", node=Config)  # config.validate checks a config against it
