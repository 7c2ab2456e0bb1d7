"""Building, training and sampling any generator type on (x, y) embeddings of classes."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from a2v_flower.models.generators.base import CONDITION_DIM, BaseGenerator, Cond, class_condition
from a2v_flower.models.generators.gan import GANGenerator
from a2v_flower.models.generators.gaussian import GaussianGenerator
from a2v_flower.generator_schema import GeneratorSpec
from a2v_flower.models.generators.vae import CVAEGenerator, VAEGenerator

log = logging.getLogger(__name__)

GENERATOR_TYPES: dict[str, type[BaseGenerator]] = {
    "vae": VAEGenerator, "cvae": CVAEGenerator, "gan": GANGenerator, "gaussian": GaussianGenerator,
}


def build_generator(spec: GeneratorSpec, token_shape: tuple[int, int], cond_dim: int = CONDITION_DIM,
                    device: torch.device | str = "cpu") -> BaseGenerator:
    """A fresh generator of `spec.type` on `device`, weights seeded by `spec.seed` and drawn on the CPU (the same
    on every device; global RNG left untouched). Its noise RNG stays a CPU generator, so runs repeat anywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return GENERATOR_TYPES[spec.type](tuple(token_shape), cond_dim, spec).to(device)


def condition_for(gen: BaseGenerator, class_targets: dict[str, Tensor], class_ids: Tensor) -> Cond:
    """The condition `gen` is trained and sampled with: class_condition for conditional types, else None."""
    return class_condition(class_targets, class_ids, dim=gen.cond_dim) if gen.conditional else None


def sample_classes(gen: BaseGenerator, class_targets: dict[str, Tensor], class_ids: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """(n, K, D) samples, one per entry of class_ids (unconditioned types ignore the class)."""
    class_ids = torch.as_tensor(class_ids, dtype=torch.long)
    return gen.sample(len(class_ids), condition_for(gen, class_targets, class_ids), generator=generator)


def kl_beta(epoch: int, epochs: int, kl_warmup: float, kl_weight: float) -> float:
    """KL weight at `epoch`: 0 at epoch 0, linear up to exactly kl_weight at epoch ceil(kl_warmup * epochs)."""
    warm = math.ceil(kl_warmup * epochs)
    return kl_weight if warm == 0 else kl_weight * min(1.0, epoch / warm)


def train_generator(gen: BaseGenerator, x: Tensor, y: Tensor, class_targets: dict[str, Tensor],
                    spec: GeneratorSpec, val: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """Mini-batched epochs of `gen.fit_batch` on (x, y); returns per-epoch mean loss components (+ "val").

    Beta ramps over ceil(kl_warmup * epochs) epochs of this call. With `val` = (x_val, y_val) and a
    patience > 0, training stops after that many epochs without a lower val loss and the best
    epoch's state is restored. Moment-based types (gaussian) make a single pass.
    """
    if x.dim() != 3 or tuple(x.shape[1:]) != gen.token_shape or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x {tuple(x.shape)} with {len(y)} labels does not fit token_shape {gen.token_shape}; "
                         "expected (N > 0, K, D) and N labels")
    if spec.early_stopping_patience and val is None:
        log.warning("generator.early_stopping_patience=%s without validation data: early stopping is off",
                    spec.early_stopping_patience)
    if not bool(gen.norm.fitted):
        gen.norm.fit(x)
    dev = gen.norm.mean.device  # data follow the model: moved once, not per batch
    cond = condition_for(gen, class_targets, y)                         # (N, cond_dim) or None
    x, cond = x.to(dev), None if cond is None else cond.to(dev)
    val_cond = condition_for(gen, class_targets, val[1]) if val is not None else None
    order_rng = torch.Generator().manual_seed(spec.seed)
    history, best, best_state, stale = [], math.inf, None, 0
    for epoch in range(1 if gen.single_pass else spec.epochs):
        beta = kl_beta(epoch, spec.epochs, spec.kl_warmup, spec.kl_weight)
        order, sums = torch.randperm(len(x), generator=order_rng), {}
        step = len(x) if gen.single_pass else spec.batch_size  # moments: every row at once (exact factors, one DP release)
        for start in range(0, len(x), step):
            idx = order[start:start + step]
            for k, v in gen.fit_batch(x[idx], None if cond is None else cond[idx], kl_beta=beta).items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        row = {"epoch": epoch, **{k: v / len(x) for k, v in sums.items()}}
        row.update({"kl_beta": beta} if "kl" in row else {})
        if val is not None:
            row["val"] = gen.val_loss(val[0], val_cond)
        history.append(row)
        log.debug("generator epoch %s: %s", epoch, row)
        if val is not None and spec.early_stopping_patience:
            if row["val"] < best:
                best, best_state, stale = row["val"], gen.state_tensors(), 0
            elif (stale := stale + 1) >= spec.early_stopping_patience:
                log.info("generator early stop at epoch %s (best val %.4g)", epoch, best)
                break
    if best_state is not None:
        gen.load_state_tensors(best_state)
    return history
