"""Generators of synthetic audio embeddings: p(x | class) in the adapters' (K, D) input space.

One file per family (`vae`, `gan`, `gaussian` with its covariance models in `covariance`, and
`from_statistics`: the generator the server trains itself from the sites' class statistics), the shared base
(`base`), building, fitting and sampling them (`fitting`), how the federation uses them (`spec`; how they are
built is the schema's `GeneratorSpec`), sample quality (`quality`) and granularity keys (`keys`). Conditions
always come from `class_condition` via `condition_for`, at training and at sampling time alike.
"""

from a2v_flower.generator_schema import GeneratorSpec
from a2v_flower.models.generators.base import CONDITION_DIM, BaseGenerator, class_condition
from a2v_flower.models.generators.keys import GRANULARITIES, generator_keys, key_for
from a2v_flower.models.generators.quality import frechet_distance, moment_quality, sample_quality
from a2v_flower.models.generators.spec import ReplaySpec
from a2v_flower.models.generators.fitting import (GENERATOR_TYPES, build_generator, condition_for, kl_beta,
                                                   sample_classes, train_generator)

__all__ = ["CONDITION_DIM", "BaseGenerator", "class_condition", "GRANULARITIES", "generator_keys", "key_for",
           "frechet_distance", "moment_quality", "sample_quality", "GeneratorSpec", "ReplaySpec",
           "GENERATOR_TYPES", "build_generator", "condition_for", "kl_beta", "sample_classes", "train_generator"]
