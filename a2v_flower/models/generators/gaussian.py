"""The baseline generator: a Gaussian per class (diagonal, mean + rank-r factor, or full covariance), fitted in
one pass over the data (FedPFT-style); its state is the classes' sufficient statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from a2v_flower.models.generators import covariance as CV
from a2v_flower.models.generators.base import BaseGenerator, Cond
from a2v_flower.generator_schema import GeneratorSpec

SLOT_BUFFERS = ("count", "total", "total_sq", "factor", "scatter")  # per class, first dimension = slot


class GaussianGenerator(BaseGenerator):
    """A Gaussian per class (standardised space), classes keyed by their condition.

    No parameters, no optimizer. Per class: count, sum and sum of squares (float64), and by `spec.covariance`
    nothing more (diag), a (K*D, r) factor W of the centred scatter (lowrank: covariance W W^T / n plus the
    diagonal residual that keeps each feature's variance), or the sum of outer products (full: covariance
    shrunk toward its diagonal by a data-chosen OAS intensity when sampled). `fit_batch` adds the batch's
    rows to their classes; `sample` draws from each row's class. With `spec.dp_epsilon` the standardiser stays
    the identity and each class is released once, clipped and noised (`covariance.private_sums`).
    """

    single_pass = True
    MATCH_TOL = 1e-3  # the same class always yields the same condition; different classes are ~1 apart

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        if spec.covariance not in CV.COVARIANCES or spec.rank < 1:
            raise ValueError(f"covariance={spec.covariance!r}, rank={spec.rank} is not allowed; expected one of "
                             f"{CV.COVARIANCES} and rank >= 1")
        self.covariance, self.rank, self.dp = spec.covariance, spec.rank, spec.dp_epsilon
        f = self.features
        self.dp_clip = spec.dp_clip or math.sqrt(f)  # K layer-normed tokens of norm sqrt(D) each
        self.register_buffer("keys", torch.zeros(0, self.cond_dim))                   # (S, cond_dim)
        self.register_buffer("count", torch.zeros(0, dtype=torch.float64))            # (S,)
        self.register_buffer("total", torch.zeros(0, f, dtype=torch.float64))         # (S, K*D)
        self.register_buffer("total_sq", torch.zeros(0, f, dtype=torch.float64))
        if self.covariance == "lowrank":
            self.register_buffer("factor", torch.zeros(0, f, self.rank))              # (S, K*D, r) float32
        elif self.covariance == "full":
            self.register_buffer("scatter", torch.zeros(0, f, f, dtype=torch.float64))  # (S, K*D, K*D)
        if self.dp is not None:
            self.norm.fitted.fill_(True)  # a standardiser fitted on the data would leak it: identity

    def _slot_names(self) -> list[str]:
        """Names of the per-class buffers this covariance keeps."""
        return [n for n in SLOT_BUFFERS if hasattr(self, n)]

    def _find(self, key: Tensor) -> int | None:
        """Index of the stored key matching `key`, or None."""
        if len(self.keys) and (d := (self.keys - key).norm(dim=1)).min() < self.MATCH_TOL:
            return int(d.argmin())
        return None

    def _slot(self, key: Tensor, create: bool) -> int:
        """Index of the stored key matching `key`, appending an empty slot if `create`."""
        if (i := self._find(key)) is not None:
            return i
        if not create:
            raise ValueError("GaussianGenerator has no statistics for this condition (class never fitted)")
        self.keys = torch.cat([self.keys, key[None]])
        for name in self._slot_names():
            b = getattr(self, name)
            setattr(self, name, torch.cat([b, b.new_zeros(1, *b.shape[1:])]))
        return len(self.keys) - 1

    def _sums(self, x: Tensor) -> tuple[float, Tensor, Tensor, Tensor | None]:
        """(count, sum, sum of squares, extra) of rows x in standardised space; extra: the (K*D, m) centred
        columns (lowrank), the (K*D, K*D) sum of outer products (full) or None. Private with dp_epsilon."""
        if self.dp is None:
            z = self.norm(x).flatten(1).double()                                  # (B, K*D)
            extra = {"diag": None, "lowrank": (z - z.mean(0)).T, "full": z.T @ z}[self.covariance]
            return float(len(z)), z.sum(0), z.pow(2).sum(0), extra
        n, s, q = CV.private_sums(x, self.dp_clip, self.dp, self.covariance != "diag", self.rng)
        m, sd = self.norm.mean.flatten().double(), self.norm.std.flatten().double()
        s_z = (s - n * m) / sd                                   # post-processing into the standardised space
        if self.covariance == "diag":
            return n, s_z, (q - 2 * m * s + n * m * m) / sd ** 2, None
        q = (q - torch.outer(s, m) - torch.outer(m, s) + n * torch.outer(m, m)) / torch.outer(sd, sd)
        extra = q if self.covariance == "full" else CV.factor_of_scatter(q - torch.outer(s_z, s_z) / n, self.rank)
        return n, s_z, q.diagonal().clone(), extra

    @torch.no_grad()
    def fit_batch(self, x: Tensor, cond: Cond = None, kl_beta: float | None = None) -> dict[str, float]:
        """Add the batch to its classes' statistics; "loss" is the batch's Gaussian NLL afterwards. With
        dp_epsilon a class already held is skipped: its noisy statistics are released once (no second cost)."""
        keys, inverse = torch.unique(self._cond(cond, len(x)), dim=0, return_inverse=True)
        for u, key in enumerate(keys):
            if self.dp is not None and self._find(key) is not None:
                continue
            s = self._slot(key, create=True)
            n, total, total_sq, extra = self._sums(x[inverse == u])
            if self.covariance == "lowrank":
                n0 = float(self.count[s])
                self.factor[s] = CV.merge_factor(n0, self.total[s] / max(n0, 1.0), self.factor[s].double(), n,
                                                 total / n, extra, self.rank).float()
            elif self.covariance == "full":
                self.scatter[s] += extra
            self.count[s] += n
            self.total[s] += total
            self.total_sq[s] += total_sq
        return {"loss": self.val_loss(x, cond)}

    def _slots(self, cond: Cond, n: int) -> Tensor:
        """(n,) slot of each row's class."""
        return torch.tensor([self._slot(k, create=False) for k in self._cond(cond, n)], dtype=torch.long)

    def _moments(self, cond: Cond, n: int, slots: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(n, K*D) mean and variance of each row's class."""
        s = self._slots(cond, n) if slots is None else slots
        mean = self.total[s] / self.count[s, None]
        return mean, (self.total_sq[s] / self.count[s, None] - mean ** 2).clamp_min(0)

    @torch.no_grad()
    def val_loss(self, x: Tensor, cond: Cond = None) -> float:
        """Mean per-element Gaussian negative log-likelihood of the marginals (standardised space; every
        covariance keeps each feature's variance, so the figure compares the three)."""
        z = self.norm(x).flatten(1).double()
        mean, var = self._moments(cond, len(x))
        var = var.clamp_min(1e-6)
        return (0.5 * ((z - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).mean().item()

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, K, D) draws of each row's class, de-standardised."""
        slots = self._slots(cond, n)
        mean, var = self._moments(cond, n, slots)
        e = self._noise(n, self.features, generator=generator).double()           # (n, K*D)
        if self.covariance == "diag":
            z = mean + var.sqrt() * e
        elif self.covariance == "lowrank":
            w = self.factor[slots].double() / self.count[slots, None, None].sqrt()   # (n, K*D, r)
            resid = (var - w.pow(2).sum(2)).clamp_min(0)
            e_r = self._noise(n, self.rank, generator=generator).double()
            z = mean + torch.einsum("nfr,nr->nf", w, e_r) + resid.sqrt() * e
        else:
            z = mean.clone()
            for s in slots.unique().tolist():
                rows = slots == s
                z[rows] += e[rows] @ self.class_root(s).T
        return self.norm.inverse(z.float().view(n, *self.token_shape))

    def class_root(self, s: int) -> Tensor:
        """(K*D, K*D) L with L L^T the shrunk covariance of slot s (full)."""
        c = float(self.count[s])
        mean = self.total[s] / c
        cov, _ = CV.shrink_to_diagonal(self.scatter[s] / c - torch.outer(mean, mean), c)
        root, info = torch.linalg.cholesky_ex(cov)
        if info:  # not positive definite (noise, or a feature without spread): through the eigenvalues
            vals, vecs = torch.linalg.eigh(cov)
            root = vecs * vals.clamp_min(0).sqrt()
        return root

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Resize the per-class buffers to the saved number of classes, then load."""
        for name in ("keys", *self._slot_names()):
            if f"model.{name}" not in tensors:
                raise ValueError(f"gaussian state has no 'model.{name}': it was not fitted with "
                                 f"generator.covariance={self.covariance!r}")
            setattr(self, name, torch.empty_like(tensors[f"model.{name}"], device=self.norm.mean.device))
        super().load_state_tensors(tensors)


@torch.no_grad()
def pool_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """sharing=averaged for gaussian generators: one state holding the class models of all the states' data.

    Averaging the tensors would be wrong: each state keeps its classes in the order it met them, and its sums
    in its own standardised space. Here each class's sums go back to embedding space, are added per class
    (matched by condition key), divided by the number of states and standardised again by the pooled mean
    and std. Exact for diag and full (sums of outer products); lowrank is a refit, approximate: the pooled
    factor is the top-r SVD of the sites' factors and their means' offsets, so what each site cut below
    rank r stays cut (its variance is kept, in the diagonal residual). "seen" is the union; the rest (RNG)
    comes from the first state."""
    fitted = [s for s in states if bool(s["model.norm.fitted"]) and len(s["model.count"])]
    if not fitted:
        return dict(states[0])
    shape, pooled = fitted[0]["model.norm.mean"].shape, []   # per class: [key, n, sum, squares, extra parts]
    for s in fitted:
        m, sd = s["model.norm.mean"].flatten().double(), s["model.norm.std"].flatten().double()
        for i, (key, c) in enumerate(zip(s["model.keys"], s["model.count"])):
            tz, tq = s["model.total"][i], s["model.total_sq"][i]
            raw, raw_sq = sd * tz + c * m, sd ** 2 * tq + 2 * sd * m * tz + c * m ** 2
            if "model.scatter" in s:      # sum x x^T = D (sum z z^T) D + (D sum z) m^T + m (D sum z)^T + c m m^T
                extra = sd[:, None] * s["model.scatter"][i] * sd + torch.outer(sd * tz, m) + torch.outer(m, sd * tz)
                extra = [extra + c * torch.outer(m, m)]
            elif "model.factor" in s:     # the factor of the centred scatter, in embedding units; its class mean
                extra = [(c, raw / c, sd[:, None] * s["model.factor"][i].double())]
            else:
                extra = []
            j = next((j for j, p in enumerate(pooled) if (p[0] - key).norm() < GaussianGenerator.MATCH_TOL), None)
            if j is None:
                pooled.append([key, c, raw, raw_sq, extra])
            else:
                p = pooled[j]
                p[1:4] = p[1] + c, p[2] + raw, p[3] + raw_sq
                p[4] = [p[4][0] + extra[0]] if "model.scatter" in s else p[4] + extra
    # divided by the number of states: the moments are ratios and stay, while the counts do not multiply by the
    # number of sites each round (in the next round every site adds its clips to the shared state again)
    k = len(fitted)
    count, sx, sxx = (torch.stack([p[i] for p in pooled]) / k for i in (1, 2, 3))
    mean = sx.sum(0) / count.sum()
    std = (sxx.sum(0) / count.sum() - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    out = dict(fitted[0])
    out |= {"model.keys": torch.stack([p[0] for p in pooled]), "model.count": count,
            "model.total": (sx - count[:, None] * mean) / std,
            "model.total_sq": (sxx - 2 * mean * sx + count[:, None] * mean ** 2) / std ** 2,
            "model.norm.mean": mean.view(shape).float(), "model.norm.std": std.view(shape).float()}
    if "model.scatter" in fitted[0]:
        out["model.scatter"] = torch.stack([(p[4][0] / k - torch.outer(a, mean) - torch.outer(mean, a)
                                             + c * torch.outer(mean, mean)) / torch.outer(std, std)
                                            for p, a, c in zip(pooled, sx, count)])
    if "model.factor" in fitted[0]:
        rank = fitted[0]["model.factor"].shape[-1]
        out["model.factor"] = torch.stack([_pooled_factor(p[4], rank, std) / math.sqrt(k) for p in pooled]).float()
    if all("seen" in s for s in states):
        out["seen"] = torch.unique(torch.cat([s["seen"] for s in states]))
    return out


def _pooled_factor(parts: list[tuple[Tensor, Tensor, Tensor]], rank: int, std: Tensor) -> Tensor:
    """Rank-r factor of one class's pooled centred scatter from the sites' (count, mean, factor) in embedding
    units: their factors and sqrt(n_i) (m_i - m) for the spread between the sites' means, cut to rank r in the
    pooled standardised space (`std`), where a fit on all the data would cut it."""
    n = sum(c for c, _, _ in parts)
    mean = sum(c * m for c, m, _ in parts) / n
    cols = [w for _, _, w in parts] + [(c.sqrt() * (m - mean))[:, None] for c, m, _ in parts]
    return CV.top_factor(torch.cat(cols, 1) / std[:, None], rank)
