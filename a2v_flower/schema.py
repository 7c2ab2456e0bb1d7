"""The config's schema: one dataclass per conf/config.yaml node (Hydra's ConfigStore): types here, values in the YAML,
rules in `__post_init__` (naming key, value, allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from a2v_flower.generator_schema import (GeneratorCheckpoint, GeneratorSpec, Granularity, Mode, Replay, Reset,
                                         ServerGeneratorSpec, Sharing)
from a2v_flower.resources import CONF_DIR  # noqa: F401 the YAML whose types this module holds (run.py takes it here)
from a2v_flower.rules import device_setting as _device, numbers as _numbers, one_of as _one_of  # torch-free

DTYPES = ("float32", "float16", "bfloat16")  # of a network's weights and activations (the last two on a GPU only)
CLIP_SEQ_LEN = 77                            # SD's CLIP text states: 77 positions
# the AST's patch geometry (AudioEncoderSpec.patch_tokens) and width, unless model.audio.tiny overrides them
AST_DEFAULTS = {"hidden_size": 768, "patch_size": 16, "frequency_stride": 10, "time_stride": 10, "num_mel_bins": 128}


@dataclass(kw_only=True)
class Splits:
    train: float = MISSING
    val: float = MISSING
    test: float = MISSING

    def __post_init__(self):
        parts = {"train": self.train, "val": self.val, "test": self.test}
        _numbers("data.splits.", self, positive=("train",), fraction=tuple(parts))  # sites need training clips
        if abs(sum(parts.values()) - 1) > 1e-6:
            raise ValueError(f"data.splits={parts} is not allowed; expected fractions summing to 1")


@dataclass(kw_only=True)
class Data:
    kind: str = MISSING               # synthetic | esc50 | hf
    root: Optional[str] = None
    path: Optional[str] = None        # hf, from here on: hub id, save_to_disk folder or audiofolder directory
    hf_splits: Optional[list[str]] = None
    audio_column: Optional[str] = None
    label_column: Optional[str] = None
    group_column: Optional[str] = None
    classes: Optional[list[str]] = None
    folds: Optional[list[int]] = None
    clip_seconds: float = MISSING
    splits: Splits = MISSING
    duplicates: str = MISSING         # drop | refuse: clips whose audio repeats an earlier row's
    clips_per_class: Optional[int] = None  # synthetic only, from here on (None: another data kind)
    seconds: Optional[float] = None
    sample_rate: Optional[int] = None
    noise: Optional[float] = None
    overlap: Optional[float] = None
    variation: Optional[float] = None

    def __post_init__(self):
        _one_of("data.kind", self.kind, ("synthetic", "esc50", "hf"))
        _one_of("data.duplicates", self.duplicates, ("drop", "refuse"))
        _numbers("data.", self, positive=("clip_seconds",))
        if self.kind == "synthetic":
            _numbers("data.", self, positive=("clips_per_class", "seconds", "sample_rate"),
                     non_negative=("noise", "variation"), fraction=("overlap",))
        if self.kind == "hf" and not (self.audio_column and self.label_column):
            raise ValueError("data=hf needs data.audio_column and data.label_column (the dataset's column names)")
        need = {"esc50": ("root", "set data.root=/path/to/ESC-50 (the folder with audio/ and meta/esc50.csv) or "
                          "export ESC50_ROOT"), "hf": ("path", "a hub id, a save_to_disk folder or an audiofolder")}
        if self.kind in need and getattr(self, need[self.kind][0]) in (None, "???"):
            raise ValueError(f"data.{need[self.kind][0]} is required for data={self.kind}: {need[self.kind][1]}")


@dataclass(kw_only=True)
class Partition:
    mode: str = MISSING               # classes | groups | iid | dirichlet | pathological | shards | pool
    sites: Optional[list[list[str]]] = None
    alpha: Optional[float] = None     # dirichlet (None: another mode), and so on: each key is its mode's
    min_partition_size: Optional[int] = None  # dirichlet
    classes_per_site: Optional[int] = None    # pathological
    shards_per_site: Optional[int] = None     # shards
    clips_per_site: Optional[int] = None      # pool

    def __post_init__(self):
        _one_of("partition.mode", self.mode,
                ("classes", "groups", "iid", "dirichlet", "pathological", "shards", "pool"))
        needs = {"dirichlet": ("alpha", "min_partition_size"), "pathological": ("classes_per_site",),
                 "shards": ("shards_per_site",), "pool": ("clips_per_site",)}.get(self.mode, ())
        if missing := [k for k in needs if getattr(self, k) is None]:
            raise ValueError(f"partition.{missing[0]} is required for partition={self.mode}")
        _numbers("partition.", self, positive=tuple(k for k in needs if k != "min_partition_size"),
                 non_negative=tuple(k for k in needs if k == "min_partition_size"))


@dataclass(kw_only=True)
class AudioEncoderSpec:
    """conf: model.audio.* (the schema's node; values and comments in conf/model/*.yaml). `name_or_path=None`
    builds a tiny random AST from `tiny` and `seed`."""

    name_or_path: Optional[str]
    sampling_rate: int
    max_length: int
    tokens: int
    batch_size: int
    tiny: Any                      # ASTConfig overrides of the tiny model, e.g. {hidden_size: 64}
    dtype: str                      # the network's weights and activations (float16 | bfloat16 on a GPU only)
    seed: int                       # builds the tiny model (conf: ${seed})

    def __post_init__(self):
        _numbers("model.audio.", self, positive=("sampling_rate", "max_length", "batch_size"))
        _one_of("model.audio.dtype", self.dtype, DTYPES)
        most = 1 + self.patch_tokens()
        if not 2 <= self.tokens <= most:  # the summary token + at most one token per AST patch
            raise ValueError(f"model.audio.tokens={self.tokens} is not allowed; the compact representation has a "
                             f"summary token and 1..{most - 1} pooled patch tokens: expected 2..{most} "
                             f"(model.audio.max_length={self.max_length})")

    @property
    def tiny_config(self) -> tuple[tuple[str, int], ...]:
        """`tiny` as sorted (key, value) pairs (part of the encoder's identity)."""
        return tuple(sorted(dict(self.tiny or {}).items()))

    def patch_tokens(self) -> int:
        """Patch tokens P per clip of the tiny model (the AST's states are (2 + P, D)): its patch grid over mel
        bins x frames. A saved model's own grid is read from its config when it is loaded."""
        ast = AST_DEFAULTS | dict(self.tiny_config)
        freq = (ast["num_mel_bins"] - ast["patch_size"]) // ast["frequency_stride"] + 1
        return freq * max(0, (self.max_length - ast["patch_size"]) // ast["time_stride"] + 1)


@dataclass(kw_only=True)
class TextSpec:
    """conf: model.text.* (the schema's node): where the text encoders come from; None = tiny random ones built
    offline from `seed`."""

    clip: Optional[str]
    clip_subfolder: str
    t5: Optional[str]
    t5_subfolder: str
    seed: int                       # builds the tiny encoders (conf: ${seed})


@dataclass(kw_only=True)
class Model:
    profile: str = MISSING            # tiny | pretrained
    audio: AudioEncoderSpec = MISSING
    text: TextSpec = MISSING

    def __post_init__(self):
        _one_of("model.profile", self.profile, ("tiny", "pretrained"))


@dataclass(kw_only=True)
class DiffusionSpec:
    """conf: diffusion.* -- the schema's `diffusion` node (values and comments: conf/diffusion/*.yaml): which
    pipeline renders and how; name_or_path None = a tiny random pipeline built from `seed`."""

    type: str                       # sd (CLIP 77x768) | flux (T5 Lx4096 + pooled 768)
    render_every: int               # the server renders every N rounds (0 = never)
    name_or_path: Optional[str]     # hub id or local folder of a full pipeline
    steps: int
    height: int
    width: int
    dtype: str
    cpu_offload: bool               # model CPU offload; only with CUDA
    attention_slicing: bool         # SD UNet only; FLUX has no sliced attention
    clip_images: int                # per render round, each site's first N held-out clips
    free_after_render: bool
    judge: Optional[str]            # CLIP id/folder that judges the images; None = tiny random CLIP
    guidance_scale: float           # SD: classifier-free guidance; FLUX-dev: embedded guidance
    clip_seq_len: int = CLIP_SEQ_LEN  # sd: fixed by CLIP; in the schema so that older runs' config.yaml loads
    t5_seq_len: int                 # flux: T5 positions of the conditioning
    seed: int                       # builds the tiny pipeline and seeds every render (conf: ${seed})

    def __post_init__(self):
        _one_of("diffusion.type", self.type, ("sd", "flux"))
        _one_of("diffusion.dtype", self.dtype, DTYPES)
        _one_of("diffusion.clip_seq_len", self.clip_seq_len, (CLIP_SEQ_LEN,))
        _numbers("diffusion.", self, positive=("steps", "height", "width", "t5_seq_len"),
                non_negative=("render_every", "clip_images", "guidance_scale"))


@dataclass(kw_only=True)
class Strategy:
    aggregation: str = MISSING        # avg | uniform | none | kd
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING

    def __post_init__(self):
        _one_of("strategy.aggregation", self.aggregation, ("avg", "uniform", "none", "kd"))
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"strategy.{name}={getattr(self, name)!r} is not allowed; expected a fraction in (0, 1]")


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class Device:                         # auto | cpu | cuda | cuda:N; auto: the GPU this process was handed, else CPU
    site: str = MISSING               # every model of a site (a Ray actor sees only the GPU Ray gave it)
    server: str = MISSING             # the ServerApp's models (Ray's driver: it sees every GPU) and a2v-generate

    def __post_init__(self):
        _device("device.site", self.site), _device("device.server", self.server)


@dataclass(kw_only=True)
class Adapter:
    width: int = MISSING
    heads: int = MISSING
    kind: str = MISSING
    rank: int = MISSING
    wire: str = MISSING
    normalise: bool = MISSING         # standardise inputs with the federation's moments
    token_embedding: bool = MISSING   # a learned embedding per audio token index

    def __post_init__(self):
        _numbers("adapter.", self, positive=("width", "heads", "rank"))
        _one_of("adapter.kind", self.kind, ("attention", "lowrank"))
        _one_of("adapter.wire", self.wire, ("float32", "float16"))  # numpy, which Flower's arrays use, has no bfloat16
        if self.width % self.heads:
            raise ValueError(f"adapter.width={self.width} must be divisible by adapter.heads={self.heads}")


@dataclass(kw_only=True)
class TrainSpec:
    """conf: train.* -- this class is the schema's `train` node: the YAML holds the values and their comments,
    `__post_init__` the rules (a ValueError naming the key, the value and what is allowed)."""

    local_epochs: int               # also the server's kd / refinement epochs (replay.kd_epochs, refine_epochs)
    batch_size: int
    lr: float
    weight_decay: float
    cosine_weight: float
    grad_clip: float
    loss: str                       # mse | contrastive | mse+contrastive
    temperature: float              # of the softmax over cosine similarities to all class targets
    proximal_mu: float              # FedProx: + mu/2 * ||w - w_received||^2 (0 = off)
    absent_scale: float             # FedRS: logits of classes absent from the training data x this (1 = off)

    def __post_init__(self):
        _numbers("train.", self, positive=("local_epochs", "batch_size", "lr", "temperature"),
                non_negative=("weight_decay", "cosine_weight", "grad_clip", "proximal_mu", "absent_scale"))
        _one_of("train.loss", self.loss, ("mse", "contrastive", "mse+contrastive"))
        if self.absent_scale > 1 or (self.absent_scale != 1 and self.loss == "mse"):
            raise ValueError(f"train.absent_scale={self.absent_scale!r} is not allowed with train.loss={self.loss!r}; "
                             "expected a number in [0, 1] and a loss with a contrastive term")


@dataclass(kw_only=True)
class Evaluate:
    split: str = MISSING
    mode: str = MISSING               # federated | server
    server_share: float = MISSING

    def __post_init__(self):
        _one_of("evaluate.split", self.split, ("val", "test")), _one_of("evaluate.mode", self.mode, ("federated", "server"))
        if not 0 < self.server_share < 1:
            raise ValueError(f"evaluate.server_share={self.server_share!r} is not allowed; expected a fraction in (0, 1)")


@dataclass(kw_only=True)
class Paths:
    output_root: str = MISSING
    cache_dir: str = MISSING
    run_dir: Optional[str] = None     # set by the ServerApp: the run folder sites keep their state under


@dataclass(kw_only=True)
class Wandb:
    mode: str = MISSING
    project: str = MISSING
    name: str = MISSING
    group: Optional[str] = None

    def __post_init__(self):
        _one_of("wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass(kw_only=True)
class Config:
    """The whole config; `__post_init__` holds the rules that span several nodes."""

    data: Data = MISSING
    partition: Partition = MISSING
    model: Model = MISSING
    diffusion: DiffusionSpec = MISSING
    strategy: Strategy = MISSING
    generator: GeneratorSpec = MISSING
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
    device: Device = MISSING
    adapter: Adapter = MISSING
    train: TrainSpec = MISSING
    replay: Replay = MISSING
    server_generator: ServerGeneratorSpec = MISSING
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
