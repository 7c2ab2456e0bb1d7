"""How generators are built (`GeneratorSpec`) and how the federation uses them (`ReplaySpec`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GeneratorSpec:
    """Generator architecture and optimisation hyper-parameters (conf: generator.*; ranges: schema.Generator)."""

    type: str = "cvae"
    latent_dim: int = 16
    hidden: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    batch_size: int = 32
    grad_clip: float = 1.0          # max gradient norm per optimizer (0 = off)
    kl_weight: float = 1e-2         # target beta on the per-latent-dim KL (recon is a per-element MSE)
    kl_warmup: float = 0.5          # fraction of `epochs` over which beta ramps 0 -> kl_weight
    early_stopping_patience: int = 0  # epochs without a lower val loss before stopping (0 = off)
    seed: int = 0
    covariance: str = "diag"        # gaussian: diag | lowrank (mean + rank-r factor + diagonal residual) | full
    rank: int = 16                  # gaussian lowrank: rank r of the factor
    dp_epsilon: float | None = None  # gaussian: (epsilon, covariance.DP_DELTA)-DP release of each class (None = off)
    dp_clip: float | None = None    # gaussian with dp_epsilon: L2 bound of each flattened embedding (None = sqrt(K*D))


@dataclass(frozen=True)
class ReplaySpec:
    """What sites and server do with generators (conf: generator.*, granularity.*, replay.*, mode.*, sharing.*,
    reset.*, generator_checkpoint.*)."""

    generator: GeneratorSpec
    granularity: str = "unified"
    groups: dict | None = None
    samples_per_class: int = 32
    refine_epochs: int = 0
    synthetic_samples_per_class: int = 0
    kd_epochs: int = 5
    reset_on_new_classes: bool = True  # reset.reset_generator_on_class_change
    train: bool = True               # mode.generator_training_mode
    only: bool = False               # mode.generator_only_mode
    pretrained: bool = False         # mode.use_pretrained_generators
    sharing: str = "none"            # sharing.mode: none | averaged | sequential
    checkpoint_dir: str = "generators"
    checkpoint_base: str = "generator"
    checkpoint_frequency: int = 0
    reset_every: int = 0             # reset.every_rounds
    reset_layers: tuple[str, ...] = ()  # reset.layers: parameter-name prefixes (empty = whole generator)
    checkpoint_save: bool = True     # generator_checkpoint.save: write the site's files after training

    @property
    def shared(self) -> bool:
        """All sites train one state per key (sharing=averaged|sequential)."""
        return self.sharing != "none"
