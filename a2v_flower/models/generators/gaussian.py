"""The baseline generator: per-class mean and diagonal variance, one pass over the data (FedPFT-style)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from a2v_flower.models.generators.base import BaseGenerator, Cond
from a2v_flower.models.generators.spec import GeneratorSpec


class GaussianGenerator(BaseGenerator):
    """Per-class mean and diagonal variance (running sums); classes keyed by their condition.

    No parameters, no optimizer: `fit_batch` adds the batch's count, sum and sum of squares
    (float64, standardised space) to the slot of each distinct condition; `sample` draws
    mean + std * noise from the slot whose key matches each row's condition.
    """

    single_pass = True
    MATCH_TOL = 1e-3  # the same class always yields the same condition; different classes are ~1 apart

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.register_buffer("keys", torch.zeros(0, self.cond_dim))                   # (S, cond_dim)
        self.register_buffer("count", torch.zeros(0, dtype=torch.float64))            # (S,)
        self.register_buffer("total", torch.zeros(0, self.features, dtype=torch.float64))  # (S, K*D)
        self.register_buffer("total_sq", torch.zeros(0, self.features, dtype=torch.float64))

    def _slot(self, key: Tensor, create: bool) -> int:
        """Index of the stored key matching `key`, appending an empty slot if `create`."""
        if len(self.keys) and (d := (self.keys - key).norm(dim=1)).min() < self.MATCH_TOL:
            return int(d.argmin())
        if not create:
            raise ValueError("GaussianGenerator has no statistics for this condition (class never fitted)")
        self.keys = torch.cat([self.keys, key[None]])
        self.count, self.total, self.total_sq = (torch.cat([b, b.new_zeros(1, *b.shape[1:])])
                                                 for b in (self.count, self.total, self.total_sq))
        return len(self.keys) - 1

    def _moments(self, cond: Cond, n: int) -> tuple[Tensor, Tensor]:
        """(n, K*D) mean and variance of each row's class."""
        s = torch.tensor([self._slot(k, create=False) for k in self._cond(cond, n)])
        mean = self.total[s] / self.count[s, None]
        return mean, (self.total_sq[s] / self.count[s, None] - mean ** 2).clamp_min(0)

    @torch.no_grad()
    def fit_batch(self, x: Tensor, cond: Cond = None, kl_beta: float | None = None) -> dict[str, float]:
        """Add the batch to its classes' running sums; "loss" is the batch's Gaussian NLL afterwards."""
        z = self.norm(x).flatten(1).double()                            # (B, K*D)
        keys, inverse = torch.unique(self._cond(cond, len(x)), dim=0, return_inverse=True)
        for u, key in enumerate(keys):
            s, zb = self._slot(key, create=True), z[inverse == u]
            self.count[s] += len(zb)
            self.total[s] += zb.sum(0)
            self.total_sq[s] += zb.pow(2).sum(0)
        return {"loss": self.val_loss(x, cond)}

    @torch.no_grad()
    def val_loss(self, x: Tensor, cond: Cond = None) -> float:
        """Mean per-element Gaussian negative log-likelihood (standardised space)."""
        z = self.norm(x).flatten(1).double()
        mean, var = self._moments(cond, len(x))
        var = var.clamp_min(1e-6)
        return (0.5 * ((z - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).mean().item()

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, K, D) mean + std * noise of each row's class, de-standardised."""
        mean, var = self._moments(cond, n)
        z = mean + var.sqrt() * self._noise(n, self.features, generator=generator).double()
        return self.norm.inverse(z.float().view(n, *self.token_shape))

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Resize the per-class buffers to the saved number of classes, then load."""
        for name in ("keys", "count", "total", "total_sq"):
            setattr(self, name, torch.empty_like(tensors[f"model.{name}"], device=self.norm.mean.device))
        super().load_state_tensors(tensors)


@torch.no_grad()
def pool_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """sharing=averaged for gaussian generators: one state holding the moments of all the states' data together.

    Averaging the tensors would be wrong: each state keeps its classes in the order it met them, and its sums
    in its own standardised space. Here the sums go back to embedding space, are added per class (matched by
    condition key), divided by the number of states and standardised again by the pooled mean and std. "seen"
    is the union; the rest (RNG) comes from the first state."""
    fitted = [s for s in states if bool(s["model.norm.fitted"]) and len(s["model.count"])]
    if not fitted:
        return dict(states[0])
    shape = fitted[0]["model.norm.mean"].shape
    keys, n, sx, sxx = [], [], [], []  # per pooled class: condition key, count, sum and sum of squares (raw)
    for s in fitted:
        m, sd = s["model.norm.mean"].flatten().double(), s["model.norm.std"].flatten().double()
        for key, c, tz, tq in zip(s["model.keys"], s["model.count"], s["model.total"], s["model.total_sq"]):
            raw, raw_sq = sd * tz + c * m, sd ** 2 * tq + 2 * sd * m * tz + c * m ** 2
            i = next((i for i, k in enumerate(keys) if (k - key).norm() < GaussianGenerator.MATCH_TOL), None)
            if i is None:
                keys.append(key), n.append(c), sx.append(raw), sxx.append(raw_sq)
            else:
                n[i], sx[i], sxx[i] = n[i] + c, sx[i] + raw, sxx[i] + raw_sq
    # divided by the number of states: the moments are ratios and stay, while the counts do not multiply by the
    # number of sites each round (in the next round every site adds its clips to the shared state again)
    count, sx, sxx = (torch.stack(t) / len(fitted) for t in (n, sx, sxx))
    mean = sx.sum(0) / count.sum()
    std = (sxx.sum(0) / count.sum() - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    out = dict(fitted[0])
    out |= {"model.keys": torch.stack(keys), "model.count": count,
            "model.total": (sx - count[:, None] * mean) / std,
            "model.total_sq": (sxx - 2 * mean * sx + count[:, None] * mean ** 2) / std ** 2,
            "model.norm.mean": mean.view(shape).float(), "model.norm.std": std.view(shape).float()}
    if all("seen" in s for s in states):
        out["seen"] = torch.unique(torch.cat([s["seen"] for s in states]))
    return out
