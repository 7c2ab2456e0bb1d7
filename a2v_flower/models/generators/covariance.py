"""The maths of the gaussian generator's class models: rank-r factors, data-chosen shrinkage and the
differentially private release of a class's statistics. Plain functions on float64 tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

COVARIANCES = ("diag", "lowrank", "full")
DP_DELTA = 1e-5          # the delta of every (epsilon, delta) release: well below 1 / (clips per site)
DP_PARTS = 3             # a class's release: count, sum, and sum of squares or of outer products


def top_factor(columns: Tensor, rank: int) -> Tensor:
    """(F, rank) W with W W^T the best rank-`rank` approximation of columns @ columns.T (thin SVD of the
    (F, m) columns); zero columns where m < rank."""
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    r = min(rank, len(s))
    return torch.nn.functional.pad(u[:, :r] * s[:r], (0, rank - r))


def factor_of_scatter(scatter: Tensor, rank: int) -> Tensor:
    """(F, rank) W from a symmetric (F, F) centred scatter: its top eigenvectors times the root of their
    eigenvalues (negative ones, which only noise makes, clamped to 0)."""
    vals, vecs = torch.linalg.eigh(scatter)                  # ascending
    vals, vecs = vals.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
    return torch.nn.functional.pad(vecs * vals.sqrt(), (0, rank - len(vals)))


def merge_factor(n0: float, mean0: Tensor, w0: Tensor, n1: float, mean1: Tensor, cols1: Tensor, rank: int) -> Tensor:
    """Rank-r factor of the centred scatter of two sets of rows together: each set's (factor or centred rows)
    and the term between their means, n0 n1 / (n0 + n1) (m0 - m1)(m0 - m1)^T. Exact up to the rank cut."""
    if n0 <= 0:
        return top_factor(cols1, rank)
    between = math.sqrt(n0 * n1 / (n0 + n1)) * (mean0 - mean1)
    return top_factor(torch.cat([w0, cols1, between[:, None]], 1), rank)


def shrink_to_diagonal(cov: Tensor, n: float) -> tuple[Tensor, float]:
    """The covariance shrunk toward its own diagonal by the OAS intensity (Chen et al., 2010) of its
    correlation matrix: rho = ((1 - 2/p) tr(R^2) + p^2) / ((n + 1 - 2/p)(tr(R^2) - p)), in [0, 1]. It needs
    only the covariance and the count, so it works on pooled statistics (Ledoit-Wolf needs the rows).
    Returns (shrunk covariance, rho)."""
    p = cov.shape[0]
    d = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = cov / d[:, None] / d[None, :]
    tr2 = corr.pow(2).sum().item()
    rho = 1.0 if tr2 <= p or n <= 1 else min(1.0, ((1 - 2 / p) * tr2 + p * p) / ((n + 1 - 2 / p) * (tr2 - p)))
    corr = (1 - rho) * corr + rho * torch.eye(p, dtype=cov.dtype)
    return corr * d[:, None] * d[None, :], rho


def dp_sigma(epsilon: float, delta: float = DP_DELTA, sensitivity: float = math.sqrt(DP_PARTS)) -> float:
    """Noise std of the Gaussian mechanism at (epsilon, delta)-DP for an L2 `sensitivity`, through zero-
    concentrated DP (Bun & Steinke, 2016): rho = (sqrt(ln(1/delta) + epsilon) - sqrt(ln(1/delta)))^2 gives
    (epsilon, delta), and sigma = sensitivity / sqrt(2 rho). Valid for every epsilon > 0."""
    log_d = math.log(1 / delta)
    rho = (math.sqrt(log_d + epsilon) - math.sqrt(log_d)) ** 2
    return sensitivity / math.sqrt(2 * rho)


def clip_rows(x: Tensor, bound: float) -> Tensor:
    """(N, F) rows scaled down to L2 norm <= bound (rows inside it unchanged)."""
    return x * (bound / x.norm(dim=1, keepdim=True).clamp_min(bound))


@torch.no_grad()
def private_sums(x: Tensor, bound: float, epsilon: float, outer: bool, generator: torch.Generator
                 ) -> tuple[float, Tensor, Tensor]:
    """One class's (count, sum, sum of squares (F,) or of outer products (F, F) with `outer`) of its rows
    clipped to L2 norm `bound`, each with Gaussian noise: one clip added or removed changes the count by 1,
    the sum by <= bound and the squares / outer products by <= bound^2 (L2 / Frobenius), so the three parts
    scaled by (1, bound, bound^2) have L2 sensitivity sqrt(3); sigma from `dp_sigma(epsilon)`. The outer-
    product noise is symmetric (upper triangle drawn, mirrored). The count is floored at 1."""
    x = clip_rows(x.flatten(1).double(), bound)
    sigma, f = dp_sigma(epsilon), x.shape[1]

    def noise(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    n = max(1.0, len(x) + sigma * noise(1).item())
    s = x.sum(0) + sigma * bound * noise(f)
    if outer:
        e = noise(f, f).triu()
        q = x.T @ x + sigma * bound ** 2 * (e + e.triu(1).T)
    else:
        q = x.pow(2).sum(0) + sigma * bound ** 2 * noise(f)
    return n, s, q
