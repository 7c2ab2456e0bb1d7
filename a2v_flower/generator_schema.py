"""The schema of the generator keys (generator, granularity, mode, sharing, reset, replay, server_generator,
generator_checkpoint): one dataclass per node, as in `a2v_flower.schema`, which imports them into the whole config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from a2v_flower.rules import numbers as _numbers, one_of as _one_of  # torch-free


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
                 non_negative=("weight_decay", "grad_clip", "kl_weight", "early_stopping_patience"),
                 fraction=("kl_warmup",))
        for k in ("dp_epsilon", "dp_clip"):
            if getattr(self, k) is not None and not (getattr(self, k) > 0 and self.type == "gaussian"):
                raise ValueError(f"generator.{k}={getattr(self, k)!r} is not allowed; expected null or > 0, "
                                 "with generator=gaussian")


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
class Replay:
    samples_per_class: int = MISSING
    refine_epochs: int = MISSING
    synthetic_samples_per_class: int = MISSING
    kd_epochs: int = MISSING

    def __post_init__(self):
        _numbers("replay.", self,
                 non_negative=("samples_per_class", "refine_epochs", "synthetic_samples_per_class", "kd_epochs"))


@dataclass
class ServerGenerator:
    epochs: int = MISSING
    hidden: int = MISSING
    latent_dim: int = MISSING
    lr: float = MISSING
    batch_per_class: int = MISSING
    moment_weight: float = MISSING

    def __post_init__(self):
        _numbers("server_generator.", self, positive=("hidden", "latent_dim", "lr", "batch_per_class"),
                 non_negative=("epochs", "moment_weight"))


@dataclass
class GeneratorCheckpoint:
    dir: str = MISSING
    base_name: str = MISSING
    frequency: int = MISSING
    save: bool = True                 # the predecessor's generator_save_checkpoint

    def __post_init__(self):
        _numbers("generator_checkpoint.", self, non_negative=("frequency",))
