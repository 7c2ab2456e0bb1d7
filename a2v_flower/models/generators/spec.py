"""How the federation uses generators (`ReplaySpec`); how they are built is the schema's `GeneratorSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from a2v_flower.generator_schema import GeneratorSpec


@dataclass(frozen=True, kw_only=True)
class ReplaySpec:
    """What sites and server do with generators (conf: generator.*, granularity.*, mode.*, sharing.*, reset.*,
    generator_checkpoint.*; built by `a2v_flower.config.replay_spec`). The server's use of samples is replay.*."""

    generator: GeneratorSpec
    granularity: str
    groups: dict | None
    reset_on_new_classes: bool  # reset.reset_generator_on_class_change
    train: bool  # mode.generator_training_mode
    only: bool  # mode.generator_only_mode
    pretrained: bool  # mode.use_pretrained_generators
    sharing: str  # sharing.mode: none | averaged | sequential
    checkpoint_dir: str
    checkpoint_base: str
    checkpoint_frequency: int
    reset_every: int  # reset.every_rounds
    reset_layers: tuple[str, ...]  # reset.layers: parameter-name prefixes (empty = whole generator)
    checkpoint_save: bool  # generator_checkpoint.save: write the site's files after training

    @property
    def shared(self) -> bool:
        """All sites train one state per key (sharing=averaged|sequential)."""
        return self.sharing != "none"
