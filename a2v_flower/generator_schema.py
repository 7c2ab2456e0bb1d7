"""The schema of the generator keys (generator, granularity, mode, sharing, reset, replay, server_generator,
generator_checkpoint): one dataclass per node, as in `a2v_flower.schema`, which imports them into the whole config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from a2v_flower.rules import numbers as _numbers, one_of as _one_of  # torch-free


@dataclass(kw_only=True)
class GeneratorSpec:
    """conf: generator.* -- the schema's `generator` node: architecture and optimisation of the sites' generators
    (values and comments: conf/config.yaml and conf/generator/*.yaml)."""

    type: str                       # none | gaussian | vae | cvae | gan
    latent_dim: int
    hidden: int
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    grad_clip: float                # max gradient norm per optimizer (0 = off)
    kl_weight: float                # target beta on the per-latent-dim KL (recon is a per-element MSE)
    kl_warmup: float                # fraction of `epochs` over which beta ramps 0 -> kl_weight
    early_stopping_patience: int    # epochs without a lower val loss before stopping (0 = off)
    covariance: str                 # gaussian: diag | lowrank (mean + rank-r factor + diagonal residual) | full
    rank: int                       # gaussian lowrank: rank r of the factor
    dp_epsilon: Optional[float]     # gaussian: (epsilon, covariance.DP_DELTA)-DP release of each class (None = off)
    dp_clip: Optional[float]        # gaussian with dp_epsilon: L2 bound of each flattened embedding (None = sqrt(K*D))
    seed: int                       # conf: ${seed}

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


@dataclass(kw_only=True)
class Granularity:
    granularity: str = MISSING        # unified | per_class | per_group
    groups: Any = None                # {group: [classes]}; checked against the classes by generator_keys

    def __post_init__(self):
        _one_of("granularity.granularity", self.granularity, ("unified", "per_class", "per_group"))


@dataclass(kw_only=True)
class Mode:
    generator_training_mode: bool = MISSING
    generator_only_mode: bool = MISSING
    use_pretrained_generators: bool = MISSING


@dataclass(kw_only=True)
class Sharing:
    mode: str = MISSING               # none | averaged | sequential

    def __post_init__(self):
        _one_of("sharing.mode", self.mode, ("none", "averaged", "sequential"))


@dataclass(kw_only=True)
class Reset:
    reset_generator_on_class_change: bool = MISSING
    every_rounds: int = MISSING
    layers: list[str] = MISSING

    def __post_init__(self):
        _numbers("reset.", self, non_negative=("every_rounds",))


@dataclass(kw_only=True)
class Replay:
    samples_per_class: int = MISSING
    refine_epochs: int = MISSING
    synthetic_samples_per_class: int = MISSING
    kd_epochs: int = MISSING

    def __post_init__(self):
        _numbers("replay.", self,
                 non_negative=("samples_per_class", "refine_epochs", "synthetic_samples_per_class", "kd_epochs"))


@dataclass(kw_only=True)
class ServerGeneratorSpec:
    """conf: server_generator.* -- the generator the server trains itself from the sites' class statistics."""

    epochs: int                     # optimisation steps per round (0 = off)
    hidden: int
    latent_dim: int
    lr: float
    batch_per_class: int
    moment_weight: float

    def __post_init__(self):
        _numbers("server_generator.", self, positive=("hidden", "latent_dim", "lr", "batch_per_class"),
                 non_negative=("epochs", "moment_weight"))


@dataclass(kw_only=True)
class GeneratorCheckpoint:
    dir: str = MISSING
    base_name: str = MISSING
    frequency: int = MISSING
    save: bool = MISSING              # the predecessor's generator_save_checkpoint

    def __post_init__(self):
        _numbers("generator_checkpoint.", self, non_negative=("frequency",))
