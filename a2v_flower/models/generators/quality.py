"""How close synthetic embeddings are to real ones: mean distance, Fréchet, diversity, precision, coverage."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FULL_FRECHET_MAX_DIM = 2048  # above this many features sample_quality uses diagonal covariances


def frechet_distance(a: Tensor, b: Tensor, full: bool) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b; full or diagonal covariances."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    if not full:
        return (mean_term + (a.std(0) - b.std(0)).pow(2).sum()).item()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    sa_half = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    m = sa_half @ sb @ sa_half                                          # tr sqrt(Sa Sb) = tr sqrt(Sa^½ Sb Sa^½)
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return (mean_term + sa.trace() + sb.trace() - 2 * cross).item()


@torch.no_grad()
def moment_quality(mean: Tensor, var: Tensor, fake: Tensor) -> dict:
    """mean_l2 and diagonal Fréchet distance between samples (M, K, D) and a class known only by its
    mean and variance (K, D): what a site kept of a class whose clips have left its stage."""
    f = fake.double().flatten(1)
    gap = f.mean(0) - mean.double().flatten()
    spread = f.std(0) - var.double().flatten().clamp_min(0).sqrt()
    return {"mean_l2": gap.norm().item(), "frechet": (gap.pow(2).sum() + spread.pow(2).sum()).item()}


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Exact pairwise L2 distances (no matmul shortcut, so identical rows give exactly 0)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


@torch.no_grad()
def sample_quality(real: Tensor, fake: Tensor, threshold: float | None = None) -> dict:
    """Compare one class's real (N, K, D) and synthetic (M, K, D) embeddings, flattened.

    mean_l2: distance between the means. frechet: Fréchet distance, frechet_kind "full" covariance
    only when N and M exceed the K*D features and K*D <= FULL_FRECHET_MAX_DIM, else "diag".
    diversity_fake / diversity_real: mean pairwise L2. precision: share of fakes within `threshold`
    of some real; coverage: share of reals within `threshold` of some fake; threshold: the one used
    (default: median nearest-neighbour distance among the reals).
    """
    r, f = real.double().flatten(1), fake.double().flatten(1)
    if len(r) < 2 or len(f) < 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"sample_quality needs >= 2 real and >= 2 fake rows of equal size; "
                         f"got real {tuple(real.shape)}, fake {tuple(fake.shape)}")
    thr = _dist(r, r).fill_diagonal_(math.inf).min(1).values.median().item() if threshold is None else threshold
    fr = _dist(f, r)                                                    # (M, N)
    full = min(len(r), len(f)) > r.shape[1] and r.shape[1] <= FULL_FRECHET_MAX_DIM
    return {
        "mean_l2": (r.mean(0) - f.mean(0)).norm().item(),
        "frechet": frechet_distance(r, f, full),
        "frechet_kind": "full" if full else "diag",
        "diversity_fake": (_dist(f, f).sum() / (len(f) * (len(f) - 1))).item(),
        "diversity_real": (_dist(r, r).sum() / (len(r) * (len(r) - 1))).item(),
        "precision": (fr.min(1).values <= thr).double().mean().item(),
        "coverage": (fr.min(0).values <= thr).double().mean().item(),
        "threshold": float(thr),
    }
